"""DeepSpeed ZeRO-3 through the HF Trainer (its accelerate integration) over the patched QLoRA
Llama of distributed_worker.py (NF4 stored as bf16), one rank on CPU; run by
tests/test_distributed.py as

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/deepspeed_worker.py OUT

Two steps on the 4 sequences of `distributed_worker.batch()` (2 per rank: each step sees all
4), no gradient clipping, AdamW; rank 0 writes the logged losses, what ZeRO-3 did to the NF4
weights and the saved adapter to OUT.
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker as worker  # noqa: E402

EPS = 1e-6
STEPS = 2


class Batch(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        ids = worker.batch()[i]
        return {"input_ids": ids, "labels": ids}


def main(out: Path) -> None:
    import deepspeed.comm.torch  # noqa: F401  (the name is shadowed by torch itself in deepspeed.comm)
    from transformers import Trainer, TrainingArguments

    import qlora_kernels as qk

    # DeepSpeed's CPU shared-memory allreduce is a C++ op compiled on first use (~75 s on 2
    # cores): plain gloo collectives instead
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "train_batch_size": "auto", "gradient_clipping": "auto",
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}  # shard even tiny params
    args = TrainingArguments(output_dir=str(out / "trainer"), per_device_train_batch_size=2, max_steps=STEPS,
                             learning_rate=worker.LR, adam_epsilon=EPS, weight_decay=0.0, max_grad_norm=0.0,
                             lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
                             deepspeed=config, use_cpu=True, disable_tqdm=True)
    model = worker.build(0)
    calls = worker.count_kernel_calls()
    trainer = Trainer(model=model, args=args, train_dataset=Batch())
    trainer.train()
    engine = trainer.model_wrapped
    nf4 = {n: m.weight for n, m in engine.module.named_modules() if isinstance(m, qk.NF4Linear)}
    facts = {
        "engine": type(engine).__name__,
        "zero_stage": engine.zero_optimization_stage(),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "kernel_calls": dict(calls),
        # ZeRO-3 keeps an empty placeholder in the module and this rank's partition in ds_tensor
        "nf4": {n: [list(w.ds_shape), list(w.ds_tensor.shape), str(w.ds_tensor.dtype), w.numel()]
                for n, w in nf4.items()},
    }
    trainer.save_model(str(out / "adapter"))
    if int(os.environ["RANK"]) == 0:
        (out / "deepspeed.json").write_text(json.dumps(facts))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
