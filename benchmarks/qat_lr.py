"""qat's Block-AP learning rate, measured on one SmolLM2 block on the CPU (how its default was chosen).

    python benchmarks/qat_lr.py [--bits 3] [--block 4] [--steps 100]   # -> results/qat_lr.json

Block `--block` of SmolLM2-135M (fed the original model's inputs) is fake-quantized from RTN's
min-max grid (w`--bits` g64) and trained by Block-AP (block_ap._train_block: AdamW, cosine decay,
scales at 5x the weights' rate) for `--steps` steps on 4 windows of 256 calibration tokens; each
learning rate is scored by the block's relative output error ||f_q(h) - f(h)||^2 / ||f(h)||^2 on
20 further calibration windows it did not train on (validation text only; never the test text).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CALIB_TEXT, machine, write_json  # noqa: E402

from hypercompress.block_calls import capture_block_inputs  # noqa: E402
from hypercompress.sources.data import calibration_samples, read_text, tokenize  # noqa: E402
from hypercompress.methods.qat.block_ap import _train_block  # noqa: E402
from hypercompress.methods.qat.fake_quant import FakeQuantLinear  # noqa: E402
from hypercompress.sources.models import load_model  # noqa: E402

RATES = (0.0, 1e-5, 5e-5, 2e-4, 5e-4)
TRAIN_BATCHES = 1  # of 4 windows; the rest score


@torch.no_grad()
def held_out_error(block, index, calls, inputs, targets) -> float:
    errors = [((calls.run(block, index, b, h) - targets[b]).pow(2).mean() / targets[b].pow(2).mean()).item()
              for b, h in enumerate(inputs) if b >= TRAIN_BATCHES]
    return sum(errors) / len(errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--block", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_model("smollm2-135m")
    model = loaded.model
    calib = calibration_samples(tokenize(loaded.tokenizer, read_text(str(CALIB_TEXT))), 24, 256, 0)
    with torch.no_grad():
        hidden, calls = capture_block_inputs(model, calib, 4)
        blocks = model.model.layers
        for i in range(args.block):
            hidden = [calls.run(blocks[i], i, b, h) for b, h in enumerate(hidden)]
        targets = [calls.run(blocks[args.block], args.block, b, h) for b, h in enumerate(hidden)]
    rows = []
    for lr in RATES:
        block = copy.deepcopy(blocks[args.block])
        fakes = {}
        for name, module in list(block.named_modules()):
            if isinstance(module, torch.nn.Linear):
                fakes[name] = FakeQuantLinear.from_dense(module, args.bits, 64)
                parent, _, leaf = name.rpartition(".")
                setattr(block.get_submodule(parent), leaf, fakes[name])
        tick = time.perf_counter()
        if lr:
            _train_block(block, args.block, calls, hidden[:TRAIN_BATCHES], targets[:TRAIN_BATCHES], fakes,
                         args.steps, lr, 5 * lr, 0, "cpu")
        rows.append({"block_lr": lr, "held_out_error": held_out_error(block, args.block, calls, hidden, targets),
                     "seconds": round(time.perf_counter() - tick, 1)})
        print(rows[-1], flush=True)
        write_json("qat_lr", {"title": "qat Block-AP learning rate (one block, held-out calibration windows)",
                              "machine": machine(), "bits": args.bits, "block": args.block, "steps": args.steps,
                              "script": "python benchmarks/qat_lr.py " + " ".join(sys.argv[1:]), "rows": rows})


if __name__ == "__main__":
    main()
