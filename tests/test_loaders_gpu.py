"""FFCV loaders on CUDA yield the stored batches while the GPU is busy and epochs are left early and restarted.

FFCV copies each batch to the GPU on streams of its own, which nothing orders after the work already queued on the
caller's stream. Memory that queued work will still write, once freed to torch's caching allocator, could become a new
epoch's buffers; the late write then overwrote a batch already copied (ResNet-50 `bench pretrain` on an H200 failed a
device-side assert in the loss on such labels; FFCV #37 reports "nonsense values" with non_blocking copies and no
test case). Skipped as a whole where torch sees no CUDA device.
"""

from __future__ import annotations

import gc

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("torch sees no CUDA device", allow_module_level=True)

from conftest import make_beton  # noqa: E402

from dptool.loaders import eval_loader  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]

BATCH = 32


@pytest.fixture(autouse=True)
def _collect_loaders():
    yield
    gc.collect()


def _queue_late_writes(matmuls: int = 40, blocks: int = 8) -> None:
    """Queue about 0.1 s of matrix products on the current stream, then writes of -1 into `blocks` freed 1 MiB
    tensors behind them: small-pool memory (as ResNet training frees by the thousand) that the allocator may hand
    to the next allocation while the write is still to come."""
    x = torch.randn(4096, 4096, device="cuda")
    for _ in range(matmuls):
        x = torch.tanh(x @ x)
    for _ in range(blocks):
        torch.full((1 << 17,), -1, dtype=torch.int64, device="cuda")  # freed at once, written later
    del x


def _check(batch, expected, where: str) -> None:
    x, y = batch
    want_x, want_y = expected
    assert torch.equal(y.cpu(), want_y), f"labels differ from the CPU loader's at {where}"
    assert torch.allclose(x.cpu(), want_x, atol=1e-5), f"images differ from the CPU loader's at {where}"


def test_epochs_left_early_and_restarted_on_a_busy_gpu_yield_the_stored_batches(tmp_path):
    path = make_beton(tmp_path, "data", n_classes=10, per_class=32, size=32)  # 320 images, 10 batches
    on_cpu = list(eval_loader(path, batch_size=BATCH, res=32, workers=2))
    loader = eval_loader(path, batch_size=BATCH, res=32, workers=2, device="cuda")
    for attempt in range(12):  # left after 1 to 4 batches: the batches fetched ahead are never taken
        epoch = iter(loader)
        for k in range(attempt % 4 + 1):
            _queue_late_writes()
            _check(next(epoch), on_cpu[k], f"batch {k} of early-left epoch {attempt}")
        epoch.close()
    for whole in range(3):
        _queue_late_writes()
        n = 0
        for k, batch in enumerate(loader):
            _queue_late_writes(matmuls=4, blocks=2)
            _check(batch, on_cpu[k], f"batch {k} of whole epoch {whole}")
            n += 1
        assert n == len(on_cpu)
