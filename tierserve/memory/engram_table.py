"""One Engram layer's embedding rows (all (order, head) tables concatenated) and where they live.

Placement:
  device  rows on the compute device (an ``nn.Parameter``, so training works); gathered by plain indexing.
  cpu     rows in host RAM; not a module parameter, so ``model.to(cuda)`` leaves them there.
          ``host_gather="copy"``: a worker thread gathers the rows on the host (``index_select`` into a
          pinned staging buffer) and copies them to the device with ``non_blocking`` on a side CUDA stream;
          the table itself stays pageable. ``host_gather="zero_copy"``: the table is page-locked in place
          (``cudaHostRegister``, which unlike ``pin_memory=True`` does not round the allocation up to a
          power of two) and a Triton kernel reads the rows straight from it (``engram_triton``), on a side
          stream, or on the current stream while a CUDA graph is being captured.
  disk    rows in memory-mapped files (``numpy.memmap``), for tables larger than RAM; gathered like ``cpu``
          with ``copy`` (the OS page cache keeps hot rows in RAM). A checkpoint's tables can be mapped
          straight from its safetensors file (``engram_io``), with no copy.

``prefetch(row_ids)`` starts the gather as soon as a step's tokens are known and returns a handle;
``wait(handle)`` (at the Engram layer) returns the rows [T, num_heads * dim] on the compute device in
``out_dtype``, after making the current stream wait for the copy. FP8 rows (``fp8=True``) are stored as e4m3
codes + one UE8M0 scale per 32 values, moved as bytes and dequantised on the compute device.
"""
from __future__ import annotations

import concurrent.futures as cf
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tierserve.memory.engram_config import FP8_BLOCK, HOST_GATHERS, PLACEMENTS
from tierserve.memory.engram_fp8 import dequantize_rows, quantize_rows
from tierserve.memory.pinned import host_register, unlock_all
from tierserve.progress import ProgressBar

_NP_WORD = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}
_INIT_CHUNK = 1 << 16


@dataclass
class PrefetchHandle:
    shape: tuple[int, int]                          # [T, num_heads] row ids behind this handle
    row_ids: torch.Tensor | None = None             # gather deferred to wait() (device rows, graph capture)
    future: cf.Future | None = None                 # host gather + copy in flight
    parts: list[torch.Tensor] | None = None         # gathered tensors on the compute device
    event: torch.cuda.Event | None = None         # recorded on the side stream after the copy


class EngramTable(nn.Module):
    def __init__(self, num_rows: int, dim: int, *, placement: str = "device", device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, fp8: bool = False, host_gather: str = "auto",
                 path: str | os.PathLike | None = None, out_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if placement not in PLACEMENTS:
            raise ValueError(f"engram.placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
        if host_gather not in HOST_GATHERS:
            raise ValueError(f"engram.host_gather must be one of {', '.join(HOST_GATHERS)}, got {host_gather!r}")
        if host_gather == "auto":    # zero-copy: fastest measured on the H200, and hashed inside CUDA graphs
            host_gather = "zero_copy" if placement == "cpu" and torch.device(device).type == "cuda" else "copy"
        if host_gather == "zero_copy" and placement != "cpu":
            raise ValueError(f"engram.host_gather=zero_copy needs placement=cpu (pinned host RAM), got {placement}")
        if fp8 and dim % FP8_BLOCK:
            raise ValueError(f"FP8 rows need dim_per_head to be a multiple of {FP8_BLOCK}, got {dim}")
        self.num_rows, self.dim, self.placement, self.fp8 = int(num_rows), int(dim), placement, fp8
        self.device = torch.device(device)
        self.dtype = dtype
        self.out_dtype = out_dtype or dtype
        self.host_gather = host_gather
        self.path = Path(path) if path is not None else None
        self._host: dict[str, torch.Tensor] = {}
        self._registered: list[torch.Tensor] = []     # page-locked host tensors (zero_copy)
        self._pool: cf.ThreadPoolExecutor | None = None
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        shapes = self.storage_shapes()
        if placement == "device":
            if fp8:
                for name, (shape, dt) in shapes.items():
                    self.register_buffer(name, torch.zeros(shape, dtype=dt, device=self.device))
            else:
                self.weight = nn.Parameter(torch.zeros(shapes["weight"][0], dtype=dtype, device=self.device))
        elif placement == "cpu":
            self._host = {n: torch.zeros(s, dtype=dt) for n, (s, dt) in shapes.items()}
            if host_gather == "zero_copy" and self.device.type == "cuda":
                for t in self._host.values():
                    host_register(t, "engram table (engram.host_gather=copy avoids it)")
                    self._registered.append(t)
        elif self.path is not None:
            self.path.mkdir(parents=True, exist_ok=True)
            self._host = {n: _memmap(self.path / f"{n}.bin", s, dt, "w+") for n, (s, dt) in shapes.items()}

    # ---- storage --------------------------------------------------------------------------------------------
    def storage_shapes(self) -> dict[str, tuple[tuple[int, int], torch.dtype]]:
        if self.fp8:
            return {"weight": ((self.num_rows, self.dim), torch.uint8),
                    "weight_scale": ((self.num_rows, self.dim // FP8_BLOCK), torch.uint8)}
        return {"weight": ((self.num_rows, self.dim), self.dtype)}

    def storage(self) -> dict[str, torch.Tensor]:
        """name -> the tensor holding the rows (uint8 codes/scales for FP8)."""
        if self.placement == "device":
            return {n: getattr(self, n) for n in self.storage_shapes()}
        if not self._host:
            raise RuntimeError("engram table on disk has no storage: give engram.disk_path or load a checkpoint")
        return self._host

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """name -> tensor as saved (FP8 codes as float8_e4m3fn, UE8M0 scales as uint8)."""
        out = {n: t.detach() for n, t in self.storage().items()}
        if self.fp8:
            out["weight"] = out["weight"].view(torch.float8_e4m3fn)
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.storage().values())

    @torch.no_grad()
    def reset_parameters(self, std: float = 1.0, generator: torch.Generator | None = None) -> None:
        """Rows ~ N(0, std^2), written in chunks (tables may be larger than RAM). A disk table without a
        file (no ``disk_path``) is skipped: it gets its rows by mapping a checkpoint. With a CUDA compute
        device the rows are drawn there (seeded from ``generator``) whatever the placement, so every
        placement gets the same rows. Tables of 1 GiB or more show a progress bar on stderr."""
        if self.placement == "disk" and not self._host:
            return
        gen_dev, chunk = torch.device("cpu"), _INIT_CHUNK
        if self.device.type == "cuda":         # draw on the GPU (fast even for 10B rows), same for every placement
            seed = int(torch.randint(0, 1 << 62, (1,), generator=generator))
            gen_dev, chunk = self.device, max(1, (1 << 26) // self.dim)     # 64M values a chunk
            generator = torch.Generator(gen_dev).manual_seed(seed)
        gib = self.nbytes() / 2**30
        bar = ProgressBar(f"engram table {gib:.1f} GiB", self.num_rows) if gib >= 1 else None
        for r0 in range(0, self.num_rows, chunk):
            n = min(chunk, self.num_rows - r0)
            rows = torch.randn(n, self.dim, generator=generator, device=gen_dev) * std
            self._write_rows(r0, rows if self.fp8 else rows.to(self.dtype))
            if bar:
                bar.advance(n)
        if bar:
            bar.close()

    @torch.no_grad()
    def load_(self, name: str, tensor: torch.Tensor) -> None:
        """Copy a checkpoint tensor into the storage; float rows into an FP8 table are quantised."""
        shapes = self.storage_shapes()
        if name not in shapes:
            hint = " (the checkpoint has FP8 rows: set engram.fp8_rows)" if name == "weight_scale" else ""
            raise ValueError(f"engram table has no tensor {name!r}, expected {sorted(shapes)}{hint}")
        if name == "weight" and tensor.dtype.is_floating_point and tensor.dtype != torch.float8_e4m3fn:
            _check_shape(name, tensor, (self.num_rows, self.dim))
            for r0 in range(0, self.num_rows, _INIT_CHUNK):     # FP8 tables quantise float rows here
                self._write_rows(r0, tensor[r0:r0 + _INIT_CHUNK])
            return
        if not self.fp8:
            raise ValueError(f"checkpoint has FP8 engram rows ({name}) but engram.fp8_rows is off")
        dst = self.storage()[name]
        _check_shape(name, tensor, tuple(dst.shape))
        dst.copy_(tensor.view(torch.uint8) if tensor.dtype == torch.float8_e4m3fn else tensor)

    def attach_(self, tensors: dict[str, torch.Tensor]) -> None:
        """Use ``tensors`` (e.g. memory-mapped from a checkpoint) as the storage of a disk table, no copy."""
        if self.placement != "disk":
            raise ValueError("attach_ is for placement=disk; other placements copy with load_")
        shapes = self.storage_shapes()
        got = {n: (t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t) for n, t in tensors.items()}
        for n, (shape, dt) in shapes.items():
            if n not in got or tuple(got[n].shape) != shape or got[n].dtype != dt:
                have = {k: (tuple(v.shape), v.dtype) for k, v in got.items()}
                raise ValueError(f"cannot map engram table tensors {have} as {shapes}: the checkpoint's "
                                 f"row format differs from the config (fp8_rows / dtype)")
        self._host = {n: got[n] for n in shapes}

    def _write_rows(self, r0: int, rows: torch.Tensor) -> None:
        st = self.storage()
        n = rows.shape[0]
        if self.fp8:
            codes, scales = quantize_rows(rows)
            st["weight"][r0:r0 + n].copy_(codes)
            st["weight_scale"][r0:r0 + n].copy_(scales)
        else:
            st["weight"][r0:r0 + n].copy_(rows)

    # ---- gather ---------------------------------------------------------------------------------------------
    @property
    def row_device(self) -> torch.device:
        """Where ``prefetch`` wants the row ids (host gathers index on the CPU)."""
        if self.placement == "device" or self.host_gather == "zero_copy":
            return self.device
        return torch.device("cpu")

    def prefetch(self, row_ids: torch.Tensor) -> PrefetchHandle:
        shape = (row_ids.shape[0], row_ids.shape[1]) if row_ids.dim() == 2 else (row_ids.numel(), 1)
        flat = row_ids.reshape(-1)
        if self.placement == "device":
            return PrefetchHandle(shape, row_ids=flat.to(self.device, non_blocking=True))
        if self.host_gather == "zero_copy":
            ids = flat.to(self.device, non_blocking=True)
            if self.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
                return PrefetchHandle(shape, row_ids=ids)
            side = self._side_stream()
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                parts = self._zero_copy(ids)
                event = torch.cuda.Event()
                event.record(side)
            ids.record_stream(side)
            return PrefetchHandle(shape, parts=parts, event=event)
        ids = flat.to("cpu")
        if self._pool is None:
            self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="engram-gather")
        return PrefetchHandle(shape, future=self._pool.submit(self._host_gather, ids))

    def wait(self, handle: PrefetchHandle) -> torch.Tensor:
        parts, event = handle.parts, handle.event
        if handle.future is not None:
            parts, event = handle.future.result()
        elif handle.row_ids is not None:
            if self.placement == "device":
                parts = [t.index_select(0, handle.row_ids) for t in self.storage().values()]
            else:
                parts = self._zero_copy(handle.row_ids)
        if event is not None:
            cur = torch.cuda.current_stream(self.device)
            cur.wait_event(event)
            for p in parts:
                p.record_stream(cur)
        T, H = handle.shape
        rows = dequantize_rows(parts[0], parts[1], self.out_dtype) if self.fp8 else parts[0].to(self.out_dtype)
        return rows.reshape(T, H * self.dim)

    def gather(self, row_ids: torch.Tensor) -> torch.Tensor:
        return self.wait(self.prefetch(row_ids))

    def _zero_copy(self, ids: torch.Tensor) -> list[torch.Tensor]:
        from tierserve.memory.engram_triton import gather_rows_zero_copy
        return [gather_rows_zero_copy(t, ids, self.device) for t in self.storage().values()]

    def _host_gather(self, ids: torch.Tensor):
        pin = self.device.type == "cuda"
        parts = []
        for t in self.storage().values():
            buf = torch.empty((ids.numel(), t.shape[1]), dtype=t.dtype, pin_memory=pin)
            torch.index_select(t, 0, ids, out=buf)
            parts.append(buf)
        if self.device.type != "cuda":
            return parts, None
        side = self._side_stream()
        with torch.cuda.stream(side):
            parts = [p.to(self.device, non_blocking=True) for p in parts]
            event = torch.cuda.Event()
            event.record(side)
        return parts, event

    def _side_stream(self) -> torch.cuda.Stream:
        if self.device not in self._streams:
            self._streams[self.device] = torch.cuda.Stream(self.device)
        return self._streams[self.device]

    def _apply(self, fn, recurse=True):
        """Follow ``module.to(device)``: the compute device moves even when the rows stay in host RAM."""
        out = super()._apply(fn, recurse)
        self.device = fn(torch.empty(0, device=self.device)).device
        if self._registered and self.device.type != "cuda":
            raise ValueError("an engram table with host_gather=zero_copy cannot leave its CUDA device")
        return out

    def close(self) -> None:
        """Stop the gather thread and unpin a zero-copy table (the table is unusable for zero_copy after)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        unlock_all(self._registered)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown
            pass

    def extra_repr(self) -> str:
        return (f"rows={self.num_rows}, dim={self.dim}, placement={self.placement}, fp8={self.fp8}, "
                f"host_gather={self.host_gather}")


def _memmap(path: Path, shape: tuple[int, int], dtype: torch.dtype, mode: str, offset: int = 0) -> torch.Tensor:
    """A torch view of a numpy memmap (``mode`` "w+" creates the file, "c" maps it copy-on-write)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    mm = np.memmap(path, dtype=_NP_WORD[itemsize], mode=mode, offset=offset, shape=shape)
    return torch.from_numpy(mm).view(dtype)


def _check_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"engram table tensor {name!r}: checkpoint shape {tuple(tensor.shape)}, "
                         f"config expects {tuple(shape)}")
