//! Stage 2 training: loop, feature cache, optimizer groups, schedule, checkpoints, publication, progress.
