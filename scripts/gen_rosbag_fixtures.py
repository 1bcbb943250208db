#!/usr/bin/env python3
"""Writes the rosbag2 fixtures (the same messages in MCAP and in sqlite3 storage) for the import tests with the `rosbags` library,
an independent ROS 2 CDR serializer, plus `expected.json` holding the exact values the importer
must read back (images as RGB8, poses in mm and roll/pitch/yaw degrees, sensor rows).

Usage: .venv/bin/python scripts/gen_rosbag_fixtures.py [OUT_DIR]   (default tests/fixtures/rosbag)
"""

import io
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image as PilImage
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_types_from_msg, get_typestore

SENSOR_FRAME_MSG = """std_msgs/Header header
float32[] values
uint32 channels
string layout
"""

BASE_NS = 1_700_000_000_000_000_000


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / 'tests/fixtures/rosbag'
    bags = {StoragePlugin.MCAP: out / 'all_types', StoragePlugin.SQLITE3: out / 'all_types_sqlite3'}
    for bag in bags.values():
        if bag.exists():
            shutil.rmtree(bag)
    out.mkdir(parents=True, exist_ok=True)

    ts = get_typestore(Stores.ROS2_HUMBLE)
    ts.register(get_types_from_msg(SENSOR_FRAME_MSG, 'vla_finetune_msgs/msg/SensorFrame'))
    T = ts.types
    Time, Header = T['builtin_interfaces/msg/Time'], T['std_msgs/msg/Header']

    def header(ns: int, frame: str) -> object:
        return Header(stamp=Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000), frame_id=frame)

    rng = np.random.default_rng(7)
    expected: dict = {'topics': {}}
    writes = []  # (topic, type, msg, log_time)

    def add(topic: str, msgtype: str, msg: object, stamp: int, log: int, value: object) -> None:
        writes.append((topic, msgtype, msg, log))
        expected['topics'].setdefault(topic, {'type': msgtype, 'messages': []})['messages'].append(
            {'stamp_ns': stamp, 'recv_ns': log, 'value': value})

    w_, h_ = 4, 3
    for k in range(3):
        stamp = BASE_NS + k * 100_000_000
        log = stamp + 3_000_000 + k * 1000
        rgb = rng.integers(0, 256, size=(h_, w_, 3), dtype=np.uint8)
        # rgb8, tightly packed.
        add('/cam/rgb', 'sensor_msgs/msg/Image',
            T['sensor_msgs/msg/Image'](header=header(stamp, 'rgb'), height=h_, width=w_, encoding='rgb8', is_bigendian=0,
                                       step=w_ * 3, data=rgb.reshape(-1)), stamp, log, rgb.reshape(-1).tolist())
        # bgr8 with 4 bytes of row padding.
        bgr = np.concatenate([rgb[:, :, ::-1].reshape(h_, -1), np.full((h_, 4), 99, np.uint8)], axis=1)
        add('/cam/bgr', 'sensor_msgs/msg/Image',
            T['sensor_msgs/msg/Image'](header=header(stamp + 1, 'bgr'), height=h_, width=w_, encoding='bgr8', is_bigendian=0,
                                       step=w_ * 3 + 4, data=bgr.reshape(-1)), stamp + 1, log + 1, rgb.reshape(-1).tolist())
        mono = rng.integers(0, 256, size=(h_, w_), dtype=np.uint8)
        add('/cam/mono', 'sensor_msgs/msg/Image',
            T['sensor_msgs/msg/Image'](header=header(stamp + 2, 'mono'), height=h_, width=w_, encoding='mono8', is_bigendian=0,
                                       step=w_, data=mono.reshape(-1)), stamp + 2, log + 2, np.repeat(mono.reshape(-1), 3).tolist())
        rgba = np.concatenate([rgb, rng.integers(0, 256, size=(h_, w_, 1), dtype=np.uint8)], axis=2)
        add('/cam/rgba', 'sensor_msgs/msg/Image',
            T['sensor_msgs/msg/Image'](header=header(stamp + 3, 'rgba'), height=h_, width=w_, encoding='rgba8', is_bigendian=0,
                                       step=w_ * 4, data=rgba.reshape(-1)), stamp + 3, log + 3, rgb.reshape(-1).tolist())
        # PNG (lossless: exact pixels) and JPEG (the decoder may differ by a few levels).
        big = np.kron(rgb, np.ones((8, 8, 1), np.uint8))  # 32x24, blocky so JPEG stays close
        for fmt, topic in (('png', '/cam/png'), ('jpeg', '/cam/jpeg')):
            buf = io.BytesIO()
            PilImage.fromarray(big).save(buf, format='PNG' if fmt == 'png' else 'JPEG', quality=95)
            data = np.frombuffer(buf.getvalue(), np.uint8)
            decoded = np.asarray(PilImage.open(io.BytesIO(buf.getvalue())).convert('RGB'))
            add(topic, 'sensor_msgs/msg/CompressedImage',
                T['sensor_msgs/msg/CompressedImage'](header=header(stamp + 4, fmt), format=fmt, data=data), stamp + 4, log + 4,
                {'width': 32, 'height': 24, 'rgb': decoded.reshape(-1).tolist(), 'bytes': len(data)})

    for k in range(5):
        stamp = BASE_NS + k * 10_000_000
        log = stamp + 500_000
        # Yaw crosses +-180 between messages.
        roll, pitch, yaw = math.radians(5.0 * k - 10.0), math.radians(2.0 - k), math.radians(170.0 + 5.0 * k)
        cr, sr, cp, sp, cy, sy = (math.cos(roll / 2), math.sin(roll / 2), math.cos(pitch / 2), math.sin(pitch / 2),
                                  math.cos(yaw / 2), math.sin(yaw / 2))
        q = (sr * cp * cy - cr * sp * sy, cr * sp * cy + sr * cp * sy, cr * cp * sy - sr * sp * cy, cr * cp * cy + sr * sp * sy)
        pos = (0.1 + 0.001 * k, -0.02 * k, 0.3 - 0.0005 * k)
        wrapped_yaw = (math.degrees(yaw) + 180.0) % 360.0 - 180.0
        add('/pose', 'geometry_msgs/msg/PoseStamped',
            T['geometry_msgs/msg/PoseStamped'](header=header(stamp, 'base'), pose=T['geometry_msgs/msg/Pose'](
                position=T['geometry_msgs/msg/Point'](x=pos[0], y=pos[1], z=pos[2]),
                orientation=T['geometry_msgs/msg/Quaternion'](x=q[0], y=q[1], z=q[2], w=q[3]))), stamp, log,
            [pos[0] * 1000, pos[1] * 1000, pos[2] * 1000, math.degrees(roll), math.degrees(pitch), wrapped_yaw])
        jp = [0.1 * k, -0.2 * k, 1.5]
        add('/joints', 'sensor_msgs/msg/JointState',
            T['sensor_msgs/msg/JointState'](header=header(stamp + 5, ''), name=['j1', 'j2', 'j3'], position=np.array(jp),
                                            velocity=np.array([0.0, 0.0, 0.0]), effort=np.array([], dtype=np.float64)),
            stamp + 5, log + 5, {'names': ['j1', 'j2', 'j3'], 'position': jp})
        wr = [1.0 + k, -2.0, 0.5 * k, 0.01, 0.02 * k, -0.03]
        add('/wrench', 'geometry_msgs/msg/WrenchStamped',
            T['geometry_msgs/msg/WrenchStamped'](header=header(stamp + 6, 'tool'), wrench=T['geometry_msgs/msg/Wrench'](
                force=T['geometry_msgs/msg/Vector3'](x=wr[0], y=wr[1], z=wr[2]),
                torque=T['geometry_msgs/msg/Vector3'](x=wr[3], y=wr[4], z=wr[5]))), stamp + 6, log + 6,
            [float(np.float32(v)) for v in wr])
        arr = rng.standard_normal(4).astype(np.float32)
        add('/array', 'std_msgs/msg/Float32MultiArray',
            T['std_msgs/msg/Float32MultiArray'](layout=T['std_msgs/msg/MultiArrayLayout'](
                dim=[T['std_msgs/msg/MultiArrayDimension'](label='channels', size=4, stride=4)], data_offset=0), data=arr),
            log + 7, log + 7, [float(v) for v in arr])
        sf = rng.standard_normal(6).astype(np.float32)
        add('/oct', 'vla_finetune_msgs/msg/SensorFrame',
            T['vla_finetune_msgs/msg/SensorFrame'](header=header(stamp + 8, 'oct'), values=sf, channels=6, layout='force,ascan[5]'),
            stamp + 8, log + 8, [float(v) for v in sf])
        # A topic that is not in the stream mapping.
        add('/chatter', 'std_msgs/msg/String', T['std_msgs/msg/String'](data=f'hello {k}'), log + 9, log + 9, None)

    # The same messages in both storage formats.
    for plugin, bag in bags.items():
        with Writer(bag, version=8, storage_plugin=plugin) as writer:
            conns = {}
            for topic, msgtype, msg, log in sorted(writes, key=lambda w: w[3]):
                if topic not in conns:
                    conns[topic] = writer.add_connection(topic, msgtype, typestore=ts)
                writer.write(conns[topic], log, ts.serialize_cdr(msg, msgtype))
        print(f'wrote {bag}')
    (out / 'expected.json').write_text(json.dumps(expected, separators=(',', ':')) + '\n')
    print(f'wrote {out / "expected.json"}')


if __name__ == '__main__':
    main()
