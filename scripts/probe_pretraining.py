"""Can a Qwen2.5-VL-shaped model learn the demo task's grounding when it is trained end to end? (issue 20)

A feasibility probe for a grounded stand-in base model (a pretrained Qwen2.5-VL cannot be downloaded
here): every weight of the embedded tiny random model (or, with WIDE=1 in the environment, a wider
random one: vision 64, language model 128) plus a linear head on the last token is trained with
AdamW to give the target's x, y (the simulator's truth log) from the images and the instruction, on
the first N scenes (S samples each) of a training recording; it prints R^2 on every sample of
scenes from another simulator seed, and on 20 training batches, every 5 epochs. Batches are drawn
afresh each epoch. With CURRICULUM=K in the environment the first K epochs train the centre of the
two disks of the named colour instead (the target and its twin; needs a truth log with
`others_mm`), a step that needs the colour but not the relation word. With SAVE=DIR the trained
model is written to DIR as a base-model folder (the tokenizer copied from the embedded model); with
INIT=DIR training starts from such a folder instead of the embedded model (the head and the
optimizer start afresh).

    vla_finetune record --sim --episodes 2000 --seconds 1.5 --seed 11 --width 112 --height 84 \
        --camera-hz 10 --out T/tr/recordings   # and --episodes 300 --seed 1011 --out T/va/...
    vla_finetune dataset compile --episodes T/tr/recordings --out T/tr/dataset --config C --allow-losses
    python scripts/probe_pretraining.py T/tr T/va S N EPOCHS [LR]     # e.g. 1 2000 30

(C as in probe_grounding.py: align.sensor_window_s 0.1, align.sensor_samples 65,
split.val_fraction 0.0.)
"""
import io, json, os, sys, time, numpy as np, torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probe_grounding import processor
from transformers import Qwen2_5_VLForConditionalGeneration
from PIL import Image
from safetensors import safe_open
torch.set_num_threads(1); torch.manual_seed(0)
M=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests/fixtures/vlm/tiny_a"); proc=processor(M)
def load(root, per, limit):
    idx=json.load(open(f"{root}/dataset/index.json")); truth=[json.loads(l) for l in open(f"{root}/recordings/sim_truth.jsonl")]
    sh={}; out=[]; seen={}
    for s in idx["samples"]:
        e=s["episode"]; seen[e]=seen.get(e,0)+1
        if seen[e]>per or e>=limit: continue
        if s["shard"] not in sh:
            f=safe_open(f"{root}/dataset/{idx['shards'][s['shard']]['file']}","np")
            sh[s["shard"]]=[(f.get_tensor(f"image.{c['name']}"),f.get_tensor(f"image.{c['name']}.offsets")) for c in idx["cameras"]]
        r=s["row"]; ims=[Image.open(io.BytesIO(d[o[r]:o[r+1]].tobytes())).convert("RGB") for d,o in sh[s["shard"]]]
        content=[{"type":"image"} for _ in ims]+[{"type":"text","text":idx["episodes"][e]["instruction"]}]
        text=proc.apply_chat_template([{"role":"user","content":content}],add_generation_prompt=True)
        t=next(t for t in truth if t["start_ns"]<=s["t_ns"]<=t["end_ns"]); y=t["target_mm"][:2]
        c=[(a+b)/2 for a,b in zip(y,t["others_mm"][0][:2])] if t.get("others_mm") else y  # the named colour's two disks
        out.append((text,ims,y,e,c))
    return out
def batches(data, bs):
    for i in range(0,len(data),bs):
        ch=data[i:i+bs]
        inp=proc(text=[c[0] for c in ch],images=[im for c in ch for im in c[1]],return_tensors="pt",padding=True)
        yield inp, torch.tensor([c[2] for c in ch],dtype=torch.float32), torch.tensor([c[4] for c in ch],dtype=torch.float32)
def r2(P,T): return float((1-((P-T)**2).sum(0)/((T-T.mean(0))**2).sum(0)).mean())
tr_root, va_root, per, n, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
t0=time.time(); tr=load(tr_root,per,n); va=load(va_root,per,10**9)
Tb=list(batches(tr[:320],16)); Vb=list(batches(va,32))  # training batches are built each epoch, shuffled
print(f"{len(tr)} training samples of {n} scenes, {len(va)} unseen; prepared in {time.time()-t0:.0f} s",flush=True)
Y=torch.tensor([c[2] for c in tr]); mu,sd=Y.mean(0),Y.std(0)
C=torch.tensor([c[4] for c in tr]); muc,sdc=C.mean(0),C.std(0)
CURRICULUM=int(os.environ.get("CURRICULUM","0"))  # epochs on the named colour's centroid first
if os.environ.get("WIDE"):
    from transformers import AutoConfig
    cfg=AutoConfig.from_pretrained(M)
    cfg.vision_config.hidden_size=64; cfg.vision_config.num_heads=4; cfg.vision_config.intermediate_size=128; cfg.vision_config.out_hidden_size=128
    cfg.text_config.hidden_size=128; cfg.text_config.num_attention_heads=4; cfg.text_config.num_key_value_heads=2; cfg.text_config.intermediate_size=256
    cfg.text_config.rope_parameters={"mrope_section":[4,6,6],"rope_theta":10000.0,"rope_type":"default"}
    torch.manual_seed(0); model=Qwen2_5_VLForConditionalGeneration(cfg).float()
    print("wide model", sum(p.numel() for p in model.parameters()), "parameters", flush=True)
else:  # INIT=DIR: go on from a model saved with SAVE (a fresh head and optimizer)
    model=Qwen2_5_VLForConditionalGeneration.from_pretrained(os.environ.get("INIT",M),dtype=torch.float32)
head=torch.nn.Linear(model.config.text_config.hidden_size,2)
opt=torch.optim.AdamW(list(model.parameters())+list(head.parameters()),float(sys.argv[6]) if len(sys.argv)>6 else 1e-3,weight_decay=1e-2)
def pred(inp):
    h=model(**inp,output_hidden_states=True).hidden_states[-1]
    last=inp["attention_mask"].sum(1)-1  # right padding
    return head(h[torch.arange(len(h)),last])
def evaluate(bs, centroid=False):
    model.eval(); k,(m,d)=(2,(muc,sdc)) if centroid else (1,(mu,sd))
    with torch.no_grad(): P=torch.cat([pred(b[0]) for b in bs])*d+m; T=torch.cat([b[k] for b in bs])
    model.train(); return r2(P,T)
for ep in range(epochs):
    tot=0; steps=0; cen=ep<CURRICULUM
    for inp,y,c in batches([tr[i] for i in torch.randperm(len(tr))],16):
        opt.zero_grad(); goal=(c-muc)/sdc if cen else (y-mu)/sd
        l=((pred(inp)-goal)**2).mean(); l.backward(); opt.step(); tot+=l.item(); steps+=1
    if ep%5==4 or ep==epochs-1 or ep==CURRICULUM-1:
        what=f"centroid R2 unseen {evaluate(Vb,True):.3f}, train {evaluate(Tb[:20],True):.3f}" if cen else f"R2 unseen {evaluate(Vb):.3f}, R2 train {evaluate(Tb[:20]):.3f}"
        print(f"epoch {ep+1}{' (centroid)' if cen else ''}: train mse {tot/steps:.3f}, {what}, {time.time()-t0:.0f} s",flush=True)
if os.environ.get("SAVE"):  # the trained model as a base-model folder (a candidate grounded stand-in)
    import shutil
    model.save_pretrained(os.environ["SAVE"])
    for f in os.listdir(M):
        if not f.startswith(".") and not os.path.exists(os.path.join(os.environ["SAVE"], f)): shutil.copy(os.path.join(M, f), os.environ["SAVE"])
    print("saved", os.environ["SAVE"], flush=True)
