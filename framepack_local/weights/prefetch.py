"""Our own block prefetcher: streamed transformer blocks computed from two reusable buffers on the device.

Why not diffusers' group offloading: its block-level stream path has open wrong-output reports
(diffusers #11981, PR #12077; PR #13502: the compute stream does not wait for the copy stream), and
``low_cpu_mem_usage`` pins every block again on every step. Here the ordering is small enough to
read and is proven on each GPU by ``memory.streaming_selftest`` before it is used.

Ordering (``k`` = a streamed block in execution order, ``s`` = one of two device slots):
- at the first block of a forward (resident or not) every slot is marked stale (weights may have
  changed between forwards) and the first streamed block's copy starts, so it overlaps the resident
  head; a step the step cache skips never reaches the blocks and copies nothing;
- before block k computes: if no slot holds k, it is copied now (synchronously for the caller);
  the compute stream waits for the copy's event, then k's parameters become views of the slot;
- after block k: its parameters point back at their host tensors, a "computed" event is recorded
  for its slot, and block k+1 is copied into the OTHER slot; that copy first waits for the
  "computed" event of the block that used that slot last.
- a copy goes host tensor -> pinned staging buffer (one per slot, allocated once, never re-pinned)
  -> device slot, on a side stream ("overlapped") or on the compute stream ("synchronous", the
  fallback when the self-test fails: one stream orders everything). Before a staging buffer is
  refilled the host waits for its previous copy's event.
On the CPU the same logic runs with CPU slots and no streams, events or staging, so the tests see
which block is copied into which slot when (``trace``).
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

ALIGN = 512  # bytes; the CUDA caching allocator's alignment, so kernels see the same pointer alignment
# CPU kernels (MKL gemv) round differently for differently aligned weights, and safetensors' zero-copy
# views sit at any 8-byte offset: on the CPU each view keeps its host tensor's address modulo 64.
CPU_MATCH = 64
HOOK_NAME = "fpl_block_prefetch"
SLOTS = 2


def align_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


def slot_bytes(tensor_nbytes, match: int = 0) -> int:
    """Pure: bytes one slot needs for a block with these tensor sizes (each tensor starts aligned;
    ``match`` extra bytes each where a view must keep its host tensor's alignment, see CPU_MATCH)."""
    return sum(align_up(int(n)) + match for n in tensor_nbytes)


def offsets(hosts: list[torch.Tensor], base_ptr: int, match: int = 0) -> list[int]:
    """Pure: where each tensor starts in a slot whose first byte is at ``base_ptr``."""
    found, cursor = [], 0
    for t in hosts:
        shift = (t.data_ptr() - base_ptr - cursor) % match if match else 0
        found.append(cursor + shift)
        cursor += align_up(_nbytes(t)) + match
    return found


def block_tensors(block: torch.nn.Module) -> list[tuple[torch.nn.Module, str, str]]:
    """(owning module, "param" | "buffer", name) for every tensor of a block, in a fixed order."""
    found = []
    for module in block.modules():
        for name, param in module._parameters.items():
            if param is not None:
                found.append((module, "param", name))
        for name, buffer in module._buffers.items():
            if buffer is not None:
                found.append((module, "buffer", name))
    return found


def _get(ref) -> torch.Tensor:
    module, kind, name = ref
    return module._parameters[name].data if kind == "param" else module._buffers[name]


def _set(ref, tensor: torch.Tensor) -> None:
    module, kind, name = ref
    if kind == "param":
        module._parameters[name].data = tensor
    else:
        module._buffers[name] = tensor


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def block_slot_bytes(block: torch.nn.Module, match: int = 0) -> int:
    return slot_bytes((_nbytes(_get(ref)) for ref in block_tensors(block)), match)


class CudaCalls:
    """The CUDA calls the prefetcher makes, in one place: the CPU tests pass a recording stand-in
    (there is no GPU to test on), the real ones run on a GPU and in the streaming self-test."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def new_stream(self):
        return torch.cuda.Stream(self.device)

    def current_stream(self):
        return torch.cuda.current_stream(self.device)

    def new_event(self):
        return torch.cuda.Event()

    def on_stream(self, stream):
        return torch.cuda.stream(stream)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Host (pinned) -> device on the current stream, asynchronously."""
        dst.copy_(src, non_blocking=True)

    def pinned(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)


class BlockPrefetcher:
    """Streams ``blocks`` (execution order) to ``device`` through two slots; see the module docstring.

    ``head`` is the first block of the forward (resident or streamed): its call starts a new pass.
    ``overlap``: copies on a side stream (CUDA only); False copies on the compute stream.
    ``calls``: the CUDA calls (default: the real ones on a CUDA device; none on the CPU).
    """

    def __init__(self, blocks: list[torch.nn.Module], device: torch.device, *, head: torch.nn.Module | None = None,
                 overlap: bool = True, trace: list | None = None, calls: CudaCalls | None = None) -> None:
        self.blocks = list(blocks)
        self.device = torch.device(device)
        self.calls = calls or (CudaCalls(self.device) if self.device.type == "cuda" else None)
        self.cuda = self.calls is not None
        self.overlap = bool(overlap and self.cuda)
        self.trace = trace  # tests: ("copy" | "compute" | "done", k, slot) in host order
        self.copies = 0
        self.head = head if head is not None else (self.blocks[0] if self.blocks else None)
        self.match = 0 if self.device.type == "cuda" else CPU_MATCH
        capacity = max((block_slot_bytes(b, self.match) for b in self.blocks), default=0)
        n_slots = min(SLOTS, len(self.blocks))
        self.slots = [self._device_buffer(capacity) for _ in range(n_slots)]
        self.staging = [self.calls.pinned(capacity) for _ in range(n_slots)] if self.cuda else []
        self.holds: list[int | None] = [None] * n_slots  # which block each slot holds (None: stale)
        self.last_slot = n_slots - 1  # the slot of the block computed last
        self.active: tuple[int, int, list] | None = None  # (k, slot, host tensors) while block k computes
        if self.cuda:
            self.copy_stream = self.calls.new_stream() if self.overlap else None
            self.copy_done = [self.calls.new_event() for _ in range(n_slots)]
            self.computed = [self.calls.new_event() for _ in range(n_slots)]

    # ---- memory

    def _device_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    @property
    def device_bytes(self) -> int:
        return sum(s.numel() for s in self.slots)

    @property
    def pinned_bytes(self) -> int:
        return sum(s.numel() for s in self.staging)

    def _grow(self, needed: int) -> None:
        """A block grew (e.g. adapter weights were added): bigger slots, after every copy and use is done."""
        if self.cuda:
            self.calls.synchronize()
        self.slots = [self._device_buffer(needed) for _ in self.slots]
        if self.cuda:
            self.staging = [self.calls.pinned(needed) for _ in self.staging]
        self.holds = [None] * len(self.slots)

    # ---- ordering

    def _current_stream(self):
        return self.calls.current_stream()

    def _copy(self, k: int, s: int) -> None:
        """Copy block k's host tensors into slot s (see the module docstring for the waits)."""
        refs = block_tensors(self.blocks[k])
        hosts = [_get(ref) for ref in refs]
        needed = slot_bytes((_nbytes(t) for t in hosts), self.match)
        if needed > self.slots[s].numel():
            self._grow(needed)
        self.holds[s] = None
        if self.trace is not None:
            self.trace.append(("copy", k, s))
        self.copies += 1
        starts = offsets(hosts, self.slots[s].data_ptr(), self.match)
        if not self.cuda:
            self._fill(self.slots[s], hosts, starts)
        else:
            self.copy_done[s].synchronize()  # the staging buffer's previous copy has left it
            self._fill(self.staging[s], hosts, starts)
            stream = self.copy_stream if self.overlap else self._current_stream()
            with self.calls.on_stream(stream):
                stream.wait_event(self.computed[s])  # the block that used slot s last is done with it
                self.calls.copy(self.slots[s][:needed], self.staging[s][:needed])
                self.copy_done[s].record(stream)
        self.holds[s] = k

    @staticmethod
    def _fill(buffer: torch.Tensor, hosts: list[torch.Tensor], starts: list[int]) -> None:
        for t, start in zip(hosts, starts):
            n = _nbytes(t)
            if n:
                buffer[start:start + n].copy_(t.contiguous().reshape(-1).view(torch.uint8))

    def _views(self, hosts: list[torch.Tensor], s: int) -> list[torch.Tensor]:
        buffer = self.slots[s]
        return [buffer[start:start + _nbytes(t)].view(t.dtype).view(t.shape)
                for t, start in zip(hosts, offsets(hosts, buffer.data_ptr(), self.match))]

    def start_pass(self) -> None:
        """The head block is about to run: weights may have changed since the last pass."""
        self._release_failed()
        self.holds = [None] * len(self.slots)
        if self.blocks and self.head is not self.blocks[0]:
            self._copy(0, self._other(self.last_slot))

    def _other(self, s: int) -> int:
        return (s + 1) % len(self.slots)

    def _release_failed(self) -> None:
        """A forward raised inside a block: put its host tensors back; its queued kernels precede the event."""
        if self.active is not None:
            k, s, hosts = self.active
            for ref, host in zip(block_tensors(self.blocks[k]), hosts):
                _set(ref, host)
            if self.cuda:
                self.computed[s].record(self._current_stream())
            self.active = None

    def before(self, k: int) -> None:
        self._release_failed()
        if k in self.holds:
            s = self.holds.index(k)
        else:
            s = self._other(self.last_slot)
            self._copy(k, s)
        if self.cuda:
            self._current_stream().wait_event(self.copy_done[s])
        refs = block_tensors(self.blocks[k])
        hosts = [_get(ref) for ref in refs]
        for ref, view in zip(refs, self._views(hosts, s)):
            _set(ref, view)
        self.active = (k, s, hosts)
        if self.trace is not None:
            self.trace.append(("compute", k, s))

    def after(self, k: int) -> None:
        if self.active is None or self.active[0] != k:
            return
        _, s, hosts = self.active
        for ref, host in zip(block_tensors(self.blocks[k]), hosts):
            _set(ref, host)
        self.active = None
        if self.cuda:
            self.computed[s].record(self._current_stream())
        if self.trace is not None:
            self.trace.append(("done", k, s))
        self.last_slot = s
        nxt = k + 1
        if nxt < len(self.blocks) and nxt not in self.holds:
            self._copy(nxt, self._other(s))

    def close(self) -> None:
        """Put every host tensor back, wait for in-flight copies, drop the buffers."""
        self._release_failed()
        if self.cuda:
            self.calls.synchronize()
        self.slots, self.staging, self.holds = [], [], []


def _hook_class():
    """Built on first use so that importing this module does not import diffusers."""
    from diffusers.hooks import ModelHook

    class BlockPrefetchHook(ModelHook):
        """Registered in the block's diffusers hook registry before any step cache hook, so a step the
        cache skips (it returns before calling the inner forward) copies nothing."""

        def __init__(self, prefetcher: BlockPrefetcher | None, index: int | None, head: bool) -> None:
            super().__init__()
            self.prefetcher, self.index, self.head = prefetcher, index, head

        def pre_forward(self, module, *args, **kwargs):
            if self.head:
                self.prefetcher.start_pass()
            if self.index is not None:
                self.prefetcher.before(self.index)
            return args, kwargs

        def post_forward(self, module, output):
            if self.index is not None:
                self.prefetcher.after(self.index)
            return output

    return BlockPrefetchHook


def attach(prefetcher: BlockPrefetcher) -> None:
    from diffusers.hooks import HookRegistry

    cls = _hook_class()
    for k, block in enumerate(prefetcher.blocks):
        hook = cls(prefetcher, k, head=block is prefetcher.head)
        HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, HOOK_NAME)
    if prefetcher.head is not None and all(prefetcher.head is not b for b in prefetcher.blocks):
        HookRegistry.check_if_exists_or_initialize(prefetcher.head).register_hook(cls(prefetcher, None, True),
                                                                                  HOOK_NAME)


def detach(model: torch.nn.Module) -> None:
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(HOOK_NAME) is not None:
            registry.remove_hook(HOOK_NAME, recurse=False)
