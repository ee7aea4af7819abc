"""Seeded training augmentation for FFCV pipelines: random-resized crop and horizontal flip that repeat exactly.

FFCV's own `RandomResizedCropRGBImageDecoder` and `RandomHorizontalFlip` draw from Numba's per-thread generators,
which nothing seeds: two runs of one command crop and flip differently, whatever `--seed` says. These two
operations draw the same way (FFCV's crop sampler, flip with probability `flip_prob`) from a generator seeded
for each image by the batch's sample indices, in order, and the image's place in the batch. The loader's order
is a function of its seed and the epoch, so every epoch (and every seed) crops differently, a rerun repeats it,
and the result does not depend on how many threads decode or in which order they finish. The seed is not
compiled into the stage: one compiled stage (kept in Numba's disk cache) serves every seed. The price: a batch
seen twice is augmented the same way twice, which matters only for batches of one image (the same batch every
epoch), where `dptool.loaders.train_loader` uses FFCV's unseeded operations instead. The seeding costs
nothing measurable: `dptool bench loader` at 64 px on this 2-core machine, 8.2k img/s with these operations and
with FFCV's (3 runs each).

Import through `dptool._ffcv.import_ffcv("dptool.augment")`: this module subclasses FFCV's classes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
from ffcv.fields import rgb_image as _rgb
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from numba import njit

__all__ = ["SeededRandomResizedCrop", "SeededHorizontalFlip"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@njit(cache=True, nogil=True)
def _mix64(x):
    """splitmix64's finaliser: a uint64 whose bits each depend on every bit of `x`."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@njit(cache=True, nogil=True)
def _batch_key(batch_indices, salt):
    """A uint64 naming this batch: an operation's salt and the sample indices, in order."""
    h = _mix64(np.uint64(salt) * _GOLDEN)
    for k in range(len(batch_indices)):
        h = _mix64(h ^ np.uint64(batch_indices[k]))
    return h


class SeededRandomResizedCrop(_rgb.RandomResizedCropRGBImageDecoder):
    """FFCV's random-resized-crop decoder with each image's crop drawn from a generator seeded for that image."""

    def __init__(self, output_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        super().__init__(output_size, scale=scale, ratio=ratio)

    def generate_code(self) -> Callable:
        """FFCV's `ResizedCropRGBImageDecoder` decode stage, plus the per-image seeding."""
        jpg = _rgb.IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        # looked up now, not at import: dptool._ffcv_cache replaces these module attributes with cacheable ones
        imdecode_c = Compiler.compile(_rgb.imdecode)
        resize_crop_c = Compiler.compile(_rgb.resize_crop)
        get_crop_c = Compiler.compile(_rgb.get_random_crop)
        batch_key_c = _batch_key
        mix_c = _mix64
        scale = np.array(self.scale, dtype=np.float64)
        ratio = np.array(self.ratio, dtype=np.float64)

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            key = batch_key_c(batch_indices, 1)
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                    selected_size = 3 * height * width
                    temp_buffer = temp_buffer.reshape(-1)[:selected_size]
                    temp_buffer = temp_buffer.reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)
                # seeds the generator of the thread running this iteration, which draws this image's crop alone
                np.random.seed(np.uint32(mix_c(key + np.uint64(dst_ix)) >> np.uint64(32)))
                i, j, h, w = get_crop_c(height, width, scale, ratio)
                resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix])
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class SeededHorizontalFlip(Operation):
    """Flip each image left-right with probability `flip_prob`, decided by a hash of (batch, place in it)."""

    def __init__(self, flip_prob: float = 0.5):
        super().__init__()
        self.flip_prob = float(flip_prob)

    def generate_code(self) -> Callable:
        """The flip stage; it asks FFCV for the batch's sample indices (`with_indices`)."""
        my_range = Compiler.get_iterator()
        batch_key_c = _batch_key
        mix_c = _mix64
        flip_prob = self.flip_prob

        def flip(images, dst, indices):
            key = batch_key_c(indices, 2)
            for i in my_range(images.shape[0]):
                # the top 53 bits of the hash as a uniform draw in [0, 1)
                u = (mix_c(key + np.uint64(i)) >> np.uint64(11)) * (1.0 / 9007199254740992.0)
                if u < flip_prob:
                    dst[i] = images[i, :, ::-1]
                else:
                    dst[i] = images[i]
            return dst

        flip.is_parallel = True
        flip.with_indices = True
        return flip

    def declare_state_and_memory(self, previous_state):
        """Same shape and dtype out as in; one output buffer."""
        return (replace(previous_state, jit_mode=True), AllocationQuery(previous_state.shape, previous_state.dtype))
