"""The training data loader: WebDataset shards -> packed THD micro-batches for Qwen2(.5)-VL, exactly resumable.

    loader = build_train_loader(cfg, dp_rank=r, dp_size=n, spatial_merge_size=2, tokens_per_second=None)
    batch = next(loader)                  # one micro-batch = one pack
    state = loader.state_dict()           # save with the checkpoint
    loader.load_state_dict(state)         # in a fresh loader: the following batches are bit-identical
    loader.skip_counts                    # {"image_truncated": 3, ...} for the training log

Flow per data-parallel rank: the rank's shards (whole shards when there are at least as many as ranks,
else every dp_size-th sample of every shard; shard order hashed from (seed, epoch)) are read sample by
sample; each sample is validated and tokenized without decoding (samples.py: image sizes from headers ->
smart_resize -> token counts) into a buffer of ``buffer_size`` samples; the C++ First-Fit-Decreasing
packer (Open-Qwen2VL's packing, with InternVL2.5's images-per-pack cap) packs the buffer into ``seq_len``
contexts; packs at least ``min_pack_fill`` full are emitted in a hashed order, the other samples wait for
the next round. Only then are a pack's images decoded (DALI, with the JPEG augmentation whose quality is a
hash of (seed, epoch, key, index)), resized, normalized and patchified (vision.py), and collated
(collate.py).

Micro-batch (dict of CPU tensors; T = seq_len):
    input_ids (T,) int64             padded with <|endoftext|>
    labels (T,) int64                shifted: target of position i; -100 unsupervised/last/padding
    loss_weights (T,) float32        1, 1/n or 1/sqrt(n) per DataConfig.loss_reweighting; 0 where ignored
    position_ids (3, T) int64        MRoPE, restarting at 0 per sample; 0 on padding
    cu_seqlens (S+1,) int32          one segment per sample, padding as its own last segment
    max_seqlen int
    pixel_values (P, 1176) float32   HF processor order (fixed_resolution: (P, 3*p*p)); image_grid_thw (I, 3)
    pixel_values_videos (Pv, 1176)   video_grid_thw (V, 3) int64, second_per_grid_ts (V,) float32
    num_real_tokens, num_samples, num_images, num_videos int; sample_keys list[str]
With data.preference: packs of preference pairs, plus pair_segments, pair_keys, feature indices (preference.py).

Mixtures (``data.datasets``): one stream per dataset (its own shards, rank assignment and epochs), blended by
weight without RNG (mixture.py); ``stats["per_dataset"]`` counts the samples handed out per dataset name.

Exact resume: the state holds the stream position (epoch, shard, tar offset), the buffered and already
packed samples as restore keys (shard path + member offsets: re-read without scanning) and the counters;
there is no running RNG (shard order, pack order and augmentation are hashes), so a restored loader
replays the same packs, decoded the same way.

Bad samples never stop the loader: each is skipped with a reason counted in ``skip_counts`` (see
samples.SKIP_REASONS); a truncated or unreadable shard is counted and the rest of it (up to the cut) used.
A systematic failure does stop it: when ``max_consecutive_skips`` samples in a row (or two epochs' worth) were
skipped, or an epoch yields no sample at all, ``next`` raises :class:`DataPipelineError` naming the skip counts
and the first failure of the run (with its traceback) instead of looping forever (e.g. a broken decoder).
"""
from __future__ import annotations

import copy
import logging
import os
import queue
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mllm_mega.data.collate import ProcessedSample
from mllm_mega.data.config import DataConfig
from mllm_mega.data.eval_samples import build_eval_samples  # noqa: F401 (part of this module's API)
from mllm_mega.data.fixed_resolution import image_scheme
from mllm_mega.data.mixture import BlendedStream, mixture_fingerprint, mixture_shards
from mllm_mega.data.packing import pack_ffd
from mllm_mega.data.preference import sample_functions
from mllm_mega.data.samples import SampleSpec
from mllm_mega.data.shards import (RawSample, iter_shard, list_shards, rank_assignment, read_sample_at,
                                   shard_order, stable_hash)
from mllm_mega.data.text import IMAGE, TextProcessor
from mllm_mega.data.video import decode_frames
from mllm_mega.data.vision import (BadSample, decode_image_pil, image_to_patches, jpeg_quality_for,
                                   jpeg_recompress_pil, resize_pil, video_to_patches)

logger = logging.getLogger(__name__)
STATE_VERSION = 1
MAX_RECENT_SKIPS = 32
_END = object()  # end of data, from the prefetch thread


class DataPipelineError(RuntimeError):
    """The data stream yields nothing usable for a bounded stretch: a systematic failure, not bad samples."""


class _Stream:
    """The rank's resumable sequence of raw samples over epochs."""

    def __init__(self, shards, *, dp_rank, dp_size, seed, epochs, on_event):
        self.shards, self.dp_rank, self.dp_size, self.seed, self.epochs = shards, dp_rank, dp_size, seed, epochs
        self.positions, self.stride, self.phase = rank_assignment(len(shards), dp_rank, dp_size)
        self.on_event = on_event
        self.epoch, self.shard_pos, self.offset, self.sample_index = 0, 0, 0, 0
        self._iter, self._events = None, []
        self.samples_per_epoch: int | None = None  # this rank's samples in one epoch, once one has been read
        self._read_this_epoch, self._read_epoch = 0, None

    def position(self) -> dict:
        return {"epoch": self.epoch, "shard_pos": self.shard_pos, "offset": self.offset,
                "sample_index": self.sample_index}

    def set_position(self, pos: dict):
        self.epoch, self.shard_pos = int(pos["epoch"]), int(pos["shard_pos"])
        self.offset, self.sample_index = int(pos["offset"]), int(pos["sample_index"])
        self._iter = None

    def _next_shard(self):
        self.shard_pos += 1
        self.offset, self.sample_index, self._iter = 0, 0, None

    def next(self) -> tuple[RawSample, int] | None:
        while True:
            if self.epochs is not None and self.epoch >= self.epochs:
                return None
            if self.shard_pos >= len(self.positions):
                if self._read_epoch == self.epoch:  # read from its first shard on: a complete epoch
                    if self._read_this_epoch == 0 and self.epochs is None:  # would loop forever
                        raise DataPipelineError(
                            f"data: epoch {self.epoch} on DP rank {self.dp_rank} read no sample from any of its "
                            f"{len(self.positions)} shard(s) of {len(self.shards)}; see the shard warnings above")
                    self.samples_per_epoch = self._read_this_epoch
                self.epoch, self.shard_pos, self.offset, self.sample_index, self._iter = self.epoch + 1, 0, 0, 0, None
                continue
            if self.shard_pos == 0 and self.offset == 0 and self._iter is None:
                self._read_this_epoch, self._read_epoch = 0, self.epoch
            if self.offset < 0:  # the previous sample was the shard's last
                self._next_shard()
                continue
            if self._iter is None:
                path = shard_order(self.shards, self.seed, self.epoch)[self.positions[self.shard_pos]]
                self._events = []
                self._iter = iter_shard(path, self.offset, self._events)
            item = next(self._iter, None)
            for event in self._events:
                # with fewer shards than ranks every rank reads every shard: count shard problems once
                if self.stride == 1 or self.dp_rank == 0:
                    self.on_event(event.reason, os.path.basename(event.shard), event.message)
            self._events.clear()
            if item is None:
                self._next_shard()
                continue
            raw, self.offset = item
            index, self.sample_index = self.sample_index, self.sample_index + 1
            if index % self.stride == self.phase:
                self._read_this_epoch += 1
                return raw, self.epoch


class PackedLoader:
    """Iterator of packed micro-batches; see the module docstring."""

    def __init__(self, cfg: DataConfig, *, dp_rank: int = 0, dp_size: int = 1, spatial_merge_size: int = 2,
                 tokens_per_second: float | None = None, position_ids_fn=None, **image_options):
        self.cfg = cfg
        self.position_ids_fn = position_ids_fn
        # None: Qwen2-VL smart_resize (vision.py); else one size for every image (fixed_resolution.py)
        self.scheme = image_scheme(**image_options, position_ids_fn=position_ids_fn,
                                   spatial_merge_size=spatial_merge_size)
        self._resize, self._to_patches = ((self.scheme.resize, self.scheme.image_to_patches) if self.scheme
                                          else (resize_pil, image_to_patches))
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.spatial_merge_size, self.tokens_per_second = spatial_merge_size, tokens_per_second
        self.text = TextProcessor(cfg.tokenizer_dir)
        self._parse, self._collate = sample_functions(cfg)  # SFT samples or preference pairs
        if cfg.datasets:
            self._mixture_shards = mixture_shards(cfg.datasets)
            self.shards = [s for shards in self._mixture_shards for s in shards]
            # each dataset's shard order is seeded by its name, so equally named shards are not read in lockstep
            self._stream = BlendedStream(
                [_Stream(shards, dp_rank=dp_rank, dp_size=dp_size, seed=f"{cfg.seed}/{d['name']}",
                         epochs=cfg.epochs, on_event=self._skip)
                 for d, shards in zip(cfg.datasets, self._mixture_shards)],
                [d["weight"] for d in cfg.datasets], [d["name"] for d in cfg.datasets])
        else:
            self._mixture_shards = [list_shards(cfg.data_path)]
            self.shards = self._mixture_shards[0]
            self._stream = _Stream(self.shards, dp_rank=dp_rank, dp_size=dp_size, seed=cfg.seed, epochs=cfg.epochs,
                                   on_event=self._skip)
        self._dataset_of = {s: i for i, shards in enumerate(self._mixture_shards) for s in shards}
        self._buffer: list[SampleSpec] = []
        self._ready: list[list[SampleSpec]] = []
        self._round = 0
        self._last_good_epoch = [0] * len(self._mixture_shards)  # per dataset: their epochs advance independently
        self._skip_counts: dict[str, int] = {}
        self.recent_skips: list[tuple[str, str, str]] = []
        self._run_of_skips = 0  # skips since the last sample that made it into a batch
        self._first_failure: tuple[str, str, str] | None = None  # (reason, key, traceback) opening that run
        self._stats = {"samples": 0, "packs": 0, "real_tokens": 0, "images": 0, "videos": 0}
        if cfg.datasets:
            self._stats["per_dataset"] = {d["name"]: 0 for d in cfg.datasets}
        from mllm_mega.data.dali_decode import resolve_backends  # imports DALI: only when a loader is built

        self.decoder_name, self.decode_device, self.resize_backend = resolve_backends(cfg)
        if self.scheme is not None:
            self.scheme.check_resize_backend(self.resize_backend)
        self._decoder = None
        self._pool = ThreadPoolExecutor(cfg.num_workers) if cfg.num_workers > 1 else None
        # prefetching: a producer thread runs ahead; every batch travels with the state right after it
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._consumed_state: dict | None = None
        self._closed = False

    @property
    def skip_counts(self) -> dict[str, int]:
        """Skipped samples by reason, up to the last batch handed out (for the training log)."""
        return dict(self._consumed_state["skip_counts"]) if self._thread else dict(self._skip_counts)

    @property
    def stats(self) -> dict[str, int]:
        """Samples, packs, real tokens, images and videos handed out so far (and samples per dataset name)."""
        return copy.deepcopy(self._consumed_state["stats"] if self._thread else self._stats)

    # ----------------------------------------------------------------------------------------------- stream
    def _skip(self, reason: str, key: str, message: str, exc: BaseException | None = None):
        self._skip_counts[reason] = self._skip_counts.get(reason, 0) + 1
        self.recent_skips = (self.recent_skips + [(reason, key, message)])[-MAX_RECENT_SKIPS:]
        logger.debug("skipped %s: %s", key, message)
        if reason in ("truncated_tar", "unreadable_shard"):
            logger.warning("data: %s", message)
        if self._run_of_skips == 0:
            detail = "".join(traceback.format_exception(exc)).rstrip() if exc is not None else message
            self._first_failure = (reason, key, detail)
        self._run_of_skips += 1
        self._check_systematic_failure()

    def _check_systematic_failure(self):
        limit = self.cfg.max_consecutive_skips
        if not limit:
            return
        per_epoch = self._stream.samples_per_epoch
        # two epochs' worth in a row: every sample failed at least once since the last good one (a single
        # epoch's worth could span the good samples of a small, mostly bad dataset in shuffled pack order)
        bound = min(limit, 2 * per_epoch) if per_epoch else limit
        if self._run_of_skips < bound:
            return
        reason, key, detail = self._first_failure
        why = (f"data.max_consecutive_skips={limit}" if bound == limit
               else f"two epochs' worth: {per_epoch} samples per epoch on this rank")
        raise DataPipelineError(
            f"data: {self._run_of_skips} samples in a row were skipped on DP rank {self.dp_rank} ({why}), so "
            f"this is a systematic failure, not a few bad samples (a broken decoder install, wrong data "
            f"settings, unreadable data). Skips by reason: {dict(sorted(self._skip_counts.items()))}. "
            f"First failure of the run ({reason}, sample {key!r}):\n{detail}")

    def _fill_buffer(self) -> bool:
        """Read samples until the buffer is full; False when the data is exhausted."""
        while len(self._buffer) < self.cfg.buffer_size:
            item = self._stream.next()
            if item is None:
                return False
            raw, epoch = item
            dataset = self._dataset_of[raw.shard]
            try:
                spec = self._parse(raw, self.text, self.cfg, epoch, image_scheme=self.scheme)
            except Exception as exc:  # noqa: BLE001 - one odd sample must not stop training
                if not isinstance(exc, BadSample):
                    logger.exception("data: unexpected error in sample %s of %s", raw.key, raw.shard)
                reason = exc.reason if isinstance(exc, BadSample) else "unexpected_error"
                self._skip(reason, raw.key, str(exc), exc)
                if epoch - self._last_good_epoch[dataset] >= 2:
                    reason, key, detail = self._first_failure
                    raise DataPipelineError(
                        f"data: no usable sample in a whole epoch on DP rank {self.dp_rank}; skips by reason: "
                        f"{dict(sorted(self._skip_counts.items()))}. First failure ({reason}, sample "
                        f"{key!r}):\n{detail}") from None
                continue
            self._last_good_epoch[dataset] = epoch
            self._buffer.append(spec)
        return True

    def _pack_round(self) -> bool:
        """Pack the buffer and queue the packs that are full enough; False when nothing is left."""
        more = self._fill_buffer()
        if not self._buffer:
            return False
        cfg = self.cfg
        lengths = np.array([s.length for s in self._buffer], dtype=np.int64)
        images = np.array([s.num_media for s in self._buffer], dtype=np.int64)
        bins = pack_ffd(lengths, cfg.seq_len, images=images if cfg.max_images_per_pack else None,
                        max_images=cfg.max_images_per_pack, max_items=cfg.max_samples_per_pack)
        fills = [int(lengths[b].sum()) for b in bins]
        emit = [i for i, f in enumerate(fills) if not more or f >= cfg.min_pack_fill * cfg.seq_len]
        # underfull packs wait for new samples, but never let them crowd out more than half the buffer
        waiting = sorted((i for i in range(len(bins)) if i not in set(emit)), key=lambda i: (-fills[i], i))
        while waiting and (not emit or sum(len(bins[i]) for i in waiting) > cfg.buffer_size // 2):
            emit.append(waiting.pop(0))
        emit.sort(key=lambda i: (stable_hash("pack-order", cfg.seed, self._round, i), i))
        self._round += 1
        self._ready.extend([self._buffer[j] for j in bins[i]] for i in emit)
        keep = sorted(int(j) for i in waiting for j in bins[i])
        self._buffer = [self._buffer[j] for j in keep]
        return True

    def __iter__(self):
        return self

    def _produce(self) -> dict:
        while True:
            if not self._ready and not self._pack_round():
                raise StopIteration
            batch = self._materialize(self._ready.pop(0))
            if batch is not None:
                return batch

    def __next__(self) -> dict:
        if self.cfg.prefetch == 0:
            return self._produce()
        if self._thread is None:
            self._start_prefetch()
        item = self._queue.get()
        if item is _END:
            self._queue.put(_END)  # later calls raise StopIteration too
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        batch, self._consumed_state = item
        return batch

    def _start_prefetch(self):
        self._consumed_state = self._snapshot()
        self._queue = queue.Queue(maxsize=self.cfg.prefetch)
        self._thread = threading.Thread(target=self._producer, name="mllm-data-prefetch", daemon=True)
        self._thread.start()

    def _producer(self):
        try:
            while not self._closed:
                batch = self._produce()
                self._queue.put((batch, self._snapshot()))
        except StopIteration:
            self._queue.put(_END)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._queue.put(exc)

    def close(self):
        """Stop the prefetch thread (it exits after its current batch)."""
        self._closed = True
        if self._thread is not None:
            while self._thread.is_alive():
                try:
                    self._queue.get(timeout=0.1)
                except queue.Empty:
                    pass

    # ------------------------------------------------------------------------------------------- decoding
    def _get_decoder(self):
        if self._decoder is None and self.decoder_name == "dali":
            from mllm_mega.data.dali_decode import DaliDecoder

            self._decoder = DaliDecoder(self.decode_device, num_threads=self.cfg.num_workers,
                                        max_batch=self.cfg.decode_batch_size,
                                        resize=self.resize_backend == "dali")
        return self._decoder

    def _map(self, fn, *iterables):
        return list(self._pool.map(fn, *iterables)) if self._pool else list(map(fn, *iterables))

    def _decode(self, encoded, qualities, sizes, force_pil):
        """Decoded (and augmented) uint8 images, already resized when the resize backend is DALI; the
        exception instead for an image that cannot be decoded. ``force_pil[i]``: decode image i with PIL
        (transparency, which DALI drops and the HF processor composites onto white)."""
        decoder = self._get_decoder()
        out: list = [None] * len(encoded)
        on_dali = [i for i in range(len(encoded)) if decoder is not None and not force_pil[i]]
        if on_dali:
            results = decoder.decode([encoded[i] for i in on_dali], [qualities[i] for i in on_dali],
                                     [sizes[i] for i in on_dali])
            for i, result in zip(on_dali, results):
                out[i] = result
        resize_here = self.resize_backend == "dali"

        def one(i):
            try:
                image = decode_image_pil(encoded[i])
                if qualities[i] is not None:
                    image = jpeg_recompress_pil(image, qualities[i])
                return resize_pil(image, *sizes[i]) if resize_here else image
            except Exception as exc:  # PIL raises many exception types on corrupt data
                return exc

        on_pil = [i for i in range(len(encoded)) if out[i] is None]
        for i, result in zip(on_pil, self._map(one, on_pil)):
            out[i] = result
        return out

    def _materialize(self, pack: list[SampleSpec]) -> dict | None:
        """Decode, augment, resize and patchify a pack's media, drop samples whose media fail, collate."""
        cfg = self.cfg
        quality = {(si, mi): jpeg_quality_for(cfg.seed, spec.epoch, spec.key, mi, cfg.jpeg_prob, cfg.jpeg_quality)
                   for si, spec in enumerate(pack) for mi in range(spec.num_media)}
        encoded, qualities, targets, owners, force_pil = [], [], [], [], []
        for si, spec in enumerate(pack):
            for mi, medium in enumerate(spec.media):
                for frame in medium.frames:  # images and frame-sequence videos; video files come below
                    encoded.append(frame)
                    qualities.append(quality[(si, mi)])
                    targets.append(medium.resized)
                    owners.append((si, mi))
                    force_pil.append(medium.alpha)
        decoded = self._decode(encoded, qualities, targets, force_pil) if encoded else []
        resized_by_decoder = self.resize_backend == "dali"
        frames: dict[tuple[int, int], list] = {}
        bad: dict[int, tuple[str, str, BaseException | None]] = {}
        for (si, mi), image in zip(owners, decoded):
            medium = pack[si].media[mi]
            expect = medium.resized if resized_by_decoder else medium.size
            if isinstance(image, Exception) or image.shape != (*expect, 3):
                failed = isinstance(image, Exception)
                what = str(image).splitlines()[0] if failed else f"decoded shape {image.shape}, header said {expect}"
                bad.setdefault(si, ("image_decode_error" if medium.kind == IMAGE else "video_error", what,
                                    image if failed else None))
                continue
            frames.setdefault((si, mi), []).append(image)

        def patches_of(si_mi):
            medium = pack[si_mi[0]].media[si_mi[1]]
            h, w = medium.resized
            if medium.video_file is not None:
                try:
                    imgs = list(decode_frames(medium.video_file, medium.frame_indices))
                except BadSample as exc:
                    return exc
                if imgs[0].shape[:2] != medium.size:
                    return BadSample("video_error", f"decoded frames {imgs[0].shape[:2]}, header said {medium.size}")
                q = quality[si_mi]
                imgs = [resize_pil(jpeg_recompress_pil(im, q) if q is not None else im, h, w) for im in imgs]
            else:
                imgs = [im if resized_by_decoder else self._resize(im, h, w) for im in frames[si_mi]]
            if medium.kind == IMAGE:
                return self._to_patches(imgs[0], self.spatial_merge_size)[0]
            return video_to_patches(np.stack(imgs), self.spatial_merge_size)[0]

        keys = [(si, mi) for si in range(len(pack)) if si not in bad for mi in range(pack[si].num_media)]
        patches = dict(zip(keys, self._map(patches_of, keys)))
        for (si, _), result in patches.items():
            if isinstance(result, BadSample):
                bad.setdefault(si, (result.reason, str(result), result))
        for si, (reason, message, exc) in sorted(bad.items()):
            self._skip(reason, pack[si].key, f"{pack[si].key}: {message}", exc)
        samples = [ProcessedSample(pack[si], [patches[(si, mi)] for mi in range(pack[si].num_media)])
                   for si in range(len(pack)) if si not in bad]
        if not samples:
            return None
        self._run_of_skips = 0
        batch = self._collate(samples, cfg.seq_len, loss_reweighting=cfg.loss_reweighting,
                             pad_token_id=self.text.pad_token_id, spatial_merge_size=self.spatial_merge_size,
                             tokens_per_second=self.tokens_per_second, position_ids_fn=self.position_ids_fn,
                             patch_dim=self.scheme.patch_dim if self.scheme else None)
        st = self._stats
        st["samples"] += batch["num_samples"]
        st["packs"] += 1
        st["real_tokens"] += batch["num_real_tokens"]
        st["images"] += batch["num_images"]
        st["videos"] += batch["num_videos"]
        if "per_dataset" in st:
            for sample in samples:
                st["per_dataset"][self.cfg.datasets[self._dataset_of[sample.spec.restore_key[0]]]["name"]] += 1
        return batch

    # ----------------------------------------------------------------------------------------------- state
    def _fingerprint(self) -> dict:
        c = self.cfg
        return {"dp_rank": self.dp_rank, "dp_size": self.dp_size, "seed": c.seed, "seq_len": c.seq_len,
                "shards": [os.path.basename(s) for s in self.shards], "min_pixels": c.min_pixels,
                "max_pixels": c.max_pixels, "buffer_size": c.buffer_size,
                **({"preference": True} if c.preference else {}),
                **({"datasets": mixture_fingerprint(c.datasets, self._mixture_shards)} if c.datasets else {}),
                **(self.scheme.fingerprint() if self.scheme else {})}

    def state_dict(self) -> dict:
        """Everything needed to continue after the last batch handed out, exactly (JSON-serializable)."""
        if self._thread is not None:
            return copy.deepcopy(self._consumed_state)
        return self._snapshot()

    def _snapshot(self) -> dict:
        def keys(specs):
            return [[s.epoch, s.restore_key] for s in specs]

        return {"version": STATE_VERSION, "fingerprint": self._fingerprint(), "stream": self._stream.position(),
                "buffer": keys(self._buffer), "ready": [keys(p) for p in self._ready], "round": self._round,
                # a plain int for a single data_path: the state format of loaders without mixtures
                "last_good_epoch": list(self._last_good_epoch) if self.cfg.datasets else self._last_good_epoch[0],
                "skip_counts": dict(self._skip_counts), "stats": copy.deepcopy(self._stats)}

    def load_state_dict(self, state: dict):
        """Continue from ``state`` (from :meth:`state_dict`); call before the first ``next``."""
        if self._thread is not None:
            raise RuntimeError("load_state_dict must be called before iterating a prefetching loader")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} != {STATE_VERSION}")
        mine = self._fingerprint()
        for name, value in state["fingerprint"].items():
            if mine.get(name) != value:
                raise ValueError(f"loader state was saved with {name}={value!r}, this loader has {mine.get(name)!r}")

        def restore(entries):
            specs = []
            for epoch, restore_key in entries:
                try:
                    specs.append(self._parse(read_sample_at(restore_key), self.text, self.cfg, epoch,
                                             image_scheme=self.scheme))
                except (OSError, BadSample) as exc:
                    raise ValueError(f"cannot restore sample {restore_key[1]!r} from {restore_key[0]}: {exc}; "
                                     "the data changed since the state was saved") from exc
            return specs

        self._stream.set_position(state["stream"])
        self._buffer = restore(state["buffer"])
        self._ready = [restore(p) for p in state["ready"]]
        self._round = int(state["round"])
        last = state["last_good_epoch"]
        self._last_good_epoch = [int(e) for e in last] if isinstance(last, list) else [int(last)]
        self._skip_counts = dict(state["skip_counts"])
        self._stats = copy.deepcopy(state["stats"])


def build_train_loader(cfg: DataConfig, *, dp_rank: int, dp_size: int, spatial_merge_size: int = 2,
                       tokens_per_second: float | None = None, position_ids_fn=None, **image_options) -> PackedLoader:
    """The trainer's data entry point: an iterator of packed micro-batches for this data-parallel rank.

    The keyword arguments come from the model family (``FamilySpec.loader_options``): the processor's merge
    size, the MRoPE video time scale, the position-id function (None = MRoPE) and the image scheme
    (``image_processing="fixed"`` with image_size, patch_size, tokens_per_image, ...: fixed_resolution.py)."""
    return PackedLoader(cfg, dp_rank=dp_rank, dp_size=dp_size, spatial_merge_size=spatial_merge_size,
                        tokens_per_second=tokens_per_second, position_ids_fn=position_ids_fn, **image_options)
