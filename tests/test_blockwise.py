"""The block-wise method kind (methods.base.BlockwiseMethod): what each block is fitted on, which
blocks are fitted, and how a resumed walk starts."""

from __future__ import annotations

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hypercompress.methods.base import BlockData, BlockwiseMethod


class DoublesDownProj(BlockwiseMethod):
    """A fit that changes the block (its MLP output doubled) and records what it was given."""

    micro_batch = 2

    def __init__(self, finished: int = 0):
        super().__init__(config=None)
        self.seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.saved: list[int] = []
        self.finished = finished

    def fit_block(self, block, data: BlockData) -> str:
        assert torch.is_grad_enabled()  # a fit may train
        self.seen[data.index] = (torch.cat(data.inputs), torch.cat(data.targets))
        with torch.no_grad():
            block.mlp.down_proj.weight.mul_(2)
        return f"fitted {data.index}"

    def restore(self, directory, model) -> int:
        return self.finished

    def save_block(self, directory, index, block) -> None:
        self.saved.append(index)


def three_blocks() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def hidden_states(model, windows) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(input_ids=windows, output_hidden_states=True).hidden_states


def test_each_block_is_fitted_on_the_compressed_inputs_against_the_original_outputs(tmp_path):
    student = three_blocks()
    teacher = copy.deepcopy(student).requires_grad_(False)
    windows = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    names = [n for n, m in student.named_modules() if isinstance(m, torch.nn.Linear) and ".layers.2." not in n
             and n.startswith("model.layers.")]
    steps = []
    method = DoublesDownProj()
    method.apply(student, names, teacher, windows, progress=lambda *row: steps.append(row),
                 checkpoint_dir=tmp_path)
    assert sorted(method.seen) == [0, 1]  # block 2 holds none of the names: only run
    original, compressed = hidden_states(teacher, windows), hidden_states(student, windows)
    for index, (inputs, targets) in method.seen.items():
        assert torch.allclose(inputs, compressed[index], atol=1e-5)  # block 1: after block 0's fit
        assert torch.allclose(targets, original[index + 1], atol=1e-5)
    assert not torch.allclose(compressed[1], original[1], atol=1e-3)  # the fit did change block 0
    assert torch.equal(student.model.layers[2].mlp.down_proj.weight, teacher.model.layers[2].mlp.down_proj.weight)
    assert steps == [(1, 3, "fitted 0"), (2, 3, "fitted 1"), (3, 3, "fitted 1")]
    assert method.saved == [0, 1]


def test_a_resumed_walk_fits_only_the_blocks_after_the_finished_ones(tmp_path):
    student, windows = three_blocks(), torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(2))
    teacher = copy.deepcopy(student)
    names = [n for n, _ in student.named_modules() if n.endswith("mlp.down_proj")]
    method = DoublesDownProj(finished=2)
    method.walk(student, teacher, windows, names, checkpoint_dir=tmp_path, resume=True)
    assert sorted(method.seen) == [2] and method.saved == [2]
    without_resume = DoublesDownProj(finished=2)
    without_resume.walk(three_blocks(), teacher, windows, names, checkpoint_dir=tmp_path, resume=False)
    assert sorted(without_resume.seen) == [0, 1, 2]
