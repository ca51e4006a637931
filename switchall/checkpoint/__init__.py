"""Layout-free checkpoints: every tensor under its single-device name, each rank writing and
reading only its own pieces (torch.distributed.checkpoint with JSON metadata), so a checkpoint
saved under one parallel layout resumes under any other.

- `boxes`: pieces of global tensors (`GlobalTensor`), ZeRO flat ranges cut into boxes;
- `dcp_io`: DCP with JSON metadata, nothing unpickled;
- `entries`: the global keys (weights, AdamW state, XL memory);
- `training_state`: what the trainer saves and restores;
- `consolidate`: a checkpoint of any layout as the single-device state dict (export, evaluate);
- `init_from`: a run's start from exported weights, each rank reading its slices;
- `legacy`: the per-rank format of earlier versions (refused, or converted once);
- `cli`: `switchall checkpoint info|convert`, `switchall export`.
"""
