"""Variable-length attention for the padding-free packed forward.

Several sequences are packed into one row `[1, T]`; each attends only to itself (and, on sliding-window layers, to
its last `sliding_window` tokens). The sequence boundaries reach the attention function as transformers'
flash-attention kwargs `cu_seq_lens_q` / `cu_seq_lens_k` (`[n_seq + 1]` int32 offsets) and `max_length_q` /
`max_length_k` (python ints), which every model forwards to its attention layers unchanged
(transformers `modeling_flash_attention_utils.py`, `FlashAttentionKwargs`).

Backends, best first:
- `varlen`: `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10, CUDA only). `window_size=(-1, 0)` is causal and
  `(W - 1, 0)` is transformers' `sliding_window=W` (a query at q sees keys k with q - W < k <= q, masking_utils
  `sliding_window_overlay`).
- `flash_attention_2`: transformers' own flash-attn 2 path, which reads the same kwargs; needs the flash-attn package.
- `flex`: `torch.nn.attention.flex_attention` with a document (+ window) block mask; compiled on CUDA, eager (it then
  materializes the scores, fine for the tests) on the CPU.
- `sdpa`: SDPA with a dense `[T, T]` block-diagonal causal mask. Memory is quadratic in T: a correctness reference,
  and the last resort.

Shared prompts (`sfm_dpo.packing.pack_pairs(share_prompt=True)`): the keys have a layout of their own, `kv_index`
(the row position of each key, a kwarg the models hand on like the others) with offsets `cu_seq_lens_k`, and each
sequence's queries are its last keys: causal from the bottom right, as flash attention aligns queries and keys of
different lengths (query i of a sequence with q queries and k keys sees keys j <= i + k - q). Our three backends
gather the keys and values and apply that mask; transformers' flash_attention_2 path does not gather, so prompt
sharing needs one of ours (`shared_prompt_supported`).

The registered names are not in transformers' `AttentionMaskInterface`, so the model builds no mask at all for them
(masking_utils `_preprocess_mask_arguments`: "custom attention without equivalent mask creation"). That also means a
padding `attention_mask` passed to such a model is ignored: only packed rows without padding may be fed to it.
"""

import inspect
import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

logger = logging.getLogger(__name__)

# Backend -> the name registered in transformers' AttentionInterface (what `config._attn_implementation` is set to).
IMPLEMENTATIONS = {
    "varlen": "sfm_varlen",
    "flash_attention_2": "flash_attention_2",
    "flex": "sfm_flex",
    "sdpa": "sfm_sdpa_packed",
}
AUTO_ORDER = ("varlen", "flash_attention_2", "flex", "sdpa")
ATTN_BACKEND_CHOICES = ("auto", *AUTO_ORDER)


def _boundaries(query: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, int]:
    """The packed row's sequence offsets `[n_seq + 1]` (int32) and longest sequence, of the queries."""
    if query.shape[0] != 1:
        raise ValueError(
            f"The packed attention backends take one packed row (batch 1), got batch {query.shape[0]}: padded batches "
            "must use a stock attention implementation."
        )
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    if cu_seq_lens is None:
        # Every packed forward passes them (sfm_dpo.packing.packed_forward); a layer that does not hand them on (a
        # remote-code model that drops transformers' FlashAttentionKwargs) would let the packed pairs attend to each
        # other: refuse rather than train on that. The first reference or training forward stops here.
        raise ValueError(
            "The packed attention was called without cu_seq_lens_q: this model's "
            "attention layers do not pass transformers' flash-attention kwargs on, so the packed sequences would "
            "attend to each other. Train it with --padding_free false (stock padded batches)."
        )
    max_length = kwargs.get("max_length_q")
    if max_length is None:
        max_length = int((cu_seq_lens[1:] - cu_seq_lens[:-1]).max())
    return cu_seq_lens.to(torch.int32), int(max_length)


def _layout(query, key, value, kwargs: dict):
    """`(key, value, cu_seq_lens_q, max_length_q, cu_seq_lens_k, max_length_k)`: the keys and values in their layout,
    the row's own (self-attention) or, with shared prompts, gathered by `kv_index` (whose gradient sums into each
    shared token's key and value), and both offsets."""
    cu_seq_lens_q, max_length_q = _boundaries(query, kwargs)
    kv_index = kwargs.get("kv_index")
    cu_seq_lens_k = kwargs.get("cu_seq_lens_k")
    if kv_index is None:
        if cu_seq_lens_k is not None and cu_seq_lens_k is not kwargs["cu_seq_lens_q"]:
            if not torch.equal(cu_seq_lens_k, kwargs["cu_seq_lens_q"]):
                raise ValueError("Packed attention got cu_seq_lens_k != cu_seq_lens_q without a kv_index.")
        return key, value, cu_seq_lens_q, max_length_q, cu_seq_lens_q, max_length_q
    if cu_seq_lens_k is None or cu_seq_lens_k.shape != cu_seq_lens_q.shape:
        raise ValueError("Shared-prompt attention needs cu_seq_lens_k with one offset per sequence, as cu_seq_lens_q.")
    kv_index = kv_index.to(key.device)
    max_length_k = kwargs.get("max_length_k")
    if max_length_k is None:
        max_length_k = int((cu_seq_lens_k[1:] - cu_seq_lens_k[:-1]).max())
    key, value = key.index_select(2, kv_index), value.index_select(2, kv_index)
    return key, value, cu_seq_lens_q, max_length_q, cu_seq_lens_k.to(torch.int32), int(max_length_k)


def _check_unsupported(kwargs: dict, dropout: float = 0.0, backend: str | None = None) -> None:
    """What the packed backends cannot do; `backend` names one that has no attention dropout either."""
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"The packed attention backends do not support `{name}`.")
    if dropout and backend:
        raise NotImplementedError(f"The {backend} backend has no attention dropout; TRL disables dropout by default.")


_VARLEN_PARAMS: set[str] | None = None


def _varlen_params() -> set[str]:
    global _VARLEN_PARAMS
    if _VARLEN_PARAMS is None:
        from torch.nn.attention.varlen import varlen_attn

        _VARLEN_PARAMS = set(inspect.signature(varlen_attn).parameters)
    return _VARLEN_PARAMS


def varlen_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, **kwargs
):
    """`query` `[1, H, T, D]`, `key`/`value` `[1, H_kv, T, D]` -> `[1, T, H, D]`, via torch's varlen attention."""
    from torch.nn.attention.varlen import varlen_attn

    _check_unsupported(kwargs, dropout, "varlen")
    key, value, cu_seq_lens_q, max_length_q, cu_seq_lens_k, max_length_k = _layout(query, key, value, kwargs)
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, H, D]
    if q.dtype not in (torch.float16, torch.bfloat16):
        # The flash kernel behind varlen_attn takes half precision only; under autocast the rest of the layer runs in
        # it anyway (a float32 q can come out of an fp32 rotary embedding).
        if not torch.is_autocast_enabled(q.device.type):
            raise TypeError(
                f"varlen attention needs float16/bfloat16 inputs, got {q.dtype}; use bf16 or another backend."
            )
        half = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(half), k.to(half), v.to(half)
    extra = {}
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in _varlen_params():
            extra["enable_gqa"] = True
        else:  # torch 2.10/2.11: no GQA, so repeat the KV heads (as transformers' `repeat_kv`)
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    window = (-1, 0) if sliding_window is None else (sliding_window - 1, 0)
    out = varlen_attn(
        q.contiguous(), k.contiguous(), v.contiguous(), cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k,
        scale=scaling, window_size=window, **extra,
    )  # fmt: skip
    return out.unsqueeze(0).to(query.dtype), None


def _document_ids(cu_seq_lens: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """`[T]` index of the sequence each token belongs to."""
    lengths = (cu_seq_lens[1:] - cu_seq_lens[:-1]).long()
    return torch.repeat_interleave(
        torch.arange(len(lengths), device=cu_seq_lens.device), lengths, output_size=n_tokens
    )


def _key_frame(cu_seq_lens_q, cu_seq_lens_k, n_queries: int, n_keys: int):
    """`(doc_q, pos_q, doc_k, pos_k)`: each query's and key's sequence and position among its sequence's keys, the
    queries aligned to the last keys (flash attention's bottom-right causal alignment)."""
    doc_q, doc_k = _document_ids(cu_seq_lens_q, n_queries), _document_ids(cu_seq_lens_k, n_keys)
    q_lengths, k_lengths = (c[1:] - c[:-1] for c in (cu_seq_lens_q, cu_seq_lens_k))
    pos_q = torch.arange(n_queries, device=doc_q.device) - cu_seq_lens_q[doc_q] + (k_lengths - q_lengths)[doc_q]
    pos_k = torch.arange(n_keys, device=doc_k.device) - cu_seq_lens_k[doc_k]
    return doc_q, pos_q, doc_k, pos_k


def _dense_packed_mask(cu_seq_lens_q, cu_seq_lens_k, n_queries: int, n_keys: int, sliding_window: int | None):
    """`[T_q, T_k]` bool: same sequence, causal, and within the window."""
    doc_q, pos_q, doc_k, pos_k = _key_frame(cu_seq_lens_q, cu_seq_lens_k, n_queries, n_keys)
    mask = (doc_q[:, None] == doc_k[None, :]) & (pos_q[:, None] >= pos_k[None, :])
    if sliding_window is not None:
        mask &= pos_q[:, None] - pos_k[None, :] < sliding_window
    return mask


def sdpa_packed_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, **kwargs
):
    """Reference: SDPA with a dense block-diagonal causal mask. `[1, H, T, D]` -> `[1, T, H, D]`."""
    _check_unsupported(kwargs)  # sdpa itself takes dropout_p
    key, value, cu_seq_lens_q, _, cu_seq_lens_k, _ = _layout(query, key, value, kwargs)
    mask = _dense_packed_mask(cu_seq_lens_q, cu_seq_lens_k, query.shape[2], key.shape[2], sliding_window)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=key.shape[1] != query.shape[1]
    )
    return out.transpose(1, 2).contiguous(), None


_COMPILED_FLEX = None


def _flex_attention_fn(device: torch.device):
    """flex_attention is only fast compiled; eager (CPU tests) it falls back to a dense, but exact, computation."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if device.type == "cpu":
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=True)
    return _COMPILED_FLEX


def _flex_block_mask(cu_seq_lens_q, cu_seq_lens_k, n_queries: int, n_keys: int, sliding_window: int | None):
    from torch.nn.attention.flex_attention import create_block_mask

    # One forward calls every layer with the same `cu_seq_lens_q` tensor (re-entered by gradient checkpointing), so
    # the block masks are cached on that tensor: built once per forward and window, never reused for another batch.
    cache = getattr(cu_seq_lens_q, "_sfm_block_masks", None)
    if cache is None:
        cache = {}
        cu_seq_lens_q._sfm_block_masks = cache
    if sliding_window not in cache:
        doc_q, pos_q, doc_k, pos_k = _key_frame(cu_seq_lens_q, cu_seq_lens_k, n_queries, n_keys)

        def mask_mod(b, h, q_idx, kv_idx):
            keep = (doc_q[q_idx] == doc_k[kv_idx]) & (pos_q[q_idx] >= pos_k[kv_idx])
            if sliding_window is not None:
                keep = keep & (pos_q[q_idx] - pos_k[kv_idx] < sliding_window)
            return keep

        device = cu_seq_lens_q.device
        cache[sliding_window] = create_block_mask(
            mask_mod, None, None, n_queries, n_keys, device=device, _compile=device.type != "cpu"
        )
    return cache[sliding_window]


def flex_packed_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, **kwargs
):
    """flex attention with a document (+ sliding window) block mask. `[1, H, T, D]` -> `[1, T, H, D]`."""
    _check_unsupported(kwargs, dropout, "flex")
    key, value, cu_seq_lens_q, _, cu_seq_lens_k, _ = _layout(query, key, value, kwargs)
    block_mask = _flex_block_mask(cu_seq_lens_q, cu_seq_lens_k, query.shape[2], key.shape[2], sliding_window)
    out = _flex_attention_fn(query.device)(
        query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=key.shape[1] != query.shape[1]
    )
    return out.transpose(1, 2).contiguous(), None


_OURS = {"varlen": varlen_attention, "flex": flex_packed_attention, "sdpa": sdpa_packed_attention}


def register_backends() -> None:
    """Registers our backends in transformers' global AttentionInterface (idempotent)."""
    for backend, fn in _OURS.items():
        AttentionInterface.register(IMPLEMENTATIONS[backend], fn)


def _attention_fn(backend: str):
    if backend == "flash_attention_2":
        from transformers.integrations.flash_attention import flash_attention_forward

        return flash_attention_forward
    return _OURS[backend]


class _ProbeModule(torch.nn.Module):
    """What transformers' attention functions read off the calling attention layer."""

    is_causal = True
    training = False

    def __init__(self, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx


def _probe_problem(shared_prompt: bool, device: torch.device) -> tuple[dict, int, int]:
    """The packing kwargs of the probe's packed row, its query count and key count. Three sequences of 5, 12 and 7
    tokens; with `shared_prompt`, two pairs whose rejected suffixes (4 and 3 queries) read 3 and 5 keys of their
    chosen sequences first, as `sfm_dpo.packing.pack_pairs(share_prompt=True)` lays them out."""
    if not shared_prompt:
        cu_seq_lens = torch.tensor([0, 5, 17, 24], dtype=torch.int32, device=device)
        return dict(cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens, max_length_q=12, max_length_k=12), 24, 24
    kv_index = torch.cat([torch.arange(0, 5), torch.arange(0, 3), torch.arange(5, 9),
                          torch.arange(9, 17), torch.arange(9, 14), torch.arange(17, 20)])  # fmt: skip
    kwargs = dict(
        cu_seq_lens_q=torch.tensor([0, 5, 9, 17, 20], dtype=torch.int32, device=device),
        cu_seq_lens_k=torch.tensor([0, 5, 12, 20, 28], dtype=torch.int32, device=device),
        max_length_q=8, max_length_k=8, kv_index=kv_index.to(device),
    )  # fmt: skip
    return kwargs, 20, 20


def probe_backend(
    backend: str,
    device: torch.device | str,
    dtype: torch.dtype,
    need_backward: bool = True,
    head_dim: int = 64,
    shared_prompt: bool = False,
) -> str | None:
    """Runs `backend` forward (and backward, for training) on a tiny packed GQA problem with and without a sliding
    window and compares it with the dense reference. Returns None when it works, else why not (the exception or the
    error). Eager flex attention, for one, has no backward on the CPU; the flash kernels need `head_dim` % 8 == 0,
    so probe with the model's own. `shared_prompt` probes the shared-prompt layout instead (keys gathered, queries
    aligned to the last keys)."""
    device = torch.device(device)
    if backend == "varlen":
        try:
            from torch.nn.attention.varlen import varlen_attn  # noqa: F401
        except ImportError as e:
            return f"torch {torch.__version__} has no torch.nn.attention.varlen ({e})"
        if "window_size" not in _varlen_params():
            return f"torch {torch.__version__}'s varlen_attn has no window_size (needed for causal and sliding layers)"
    if backend == "flash_attention_2":
        if shared_prompt:
            return "transformers' flash_attention_2 path does not gather the shared prompt's keys (kv_index)"
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            return "the flash-attn package is not installed (or has no kernel for this GPU)"
    generator = torch.Generator().manual_seed(0)
    kwargs, n_queries, n_rows = _probe_problem(shared_prompt, device)
    q, k, v = (
        torch.randn(1, heads, n_rows, head_dim, generator=generator)
        .to(device=device, dtype=dtype)
        .requires_grad_(need_backward)
        for heads in (4, 2, 2)
    )
    module = _ProbeModule()
    scale = head_dim**-0.5
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    try:
        for window in (None, 4):
            out, _ = _attention_fn(backend)(module, q, k, v, None, scaling=scale, sliding_window=window, **kwargs)
            ref, _ = sdpa_packed_attention(module, q, k, v, None, scaling=scale, sliding_window=window, **kwargs)
            error = (out.float() - ref.float()).abs().max().item()
            if not error <= tolerance:
                return f"differs from the dense reference by {error:.3g} (sliding_window={window})"
            if need_backward:
                out.float().square().sum().backward()
    except Exception as e:  # any failure means "not usable here": the caller logs it and falls back
        return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    return None


_announced: set[tuple] = set()  # (backend, device, dtype) choices already logged by this process


def select_backend(
    requested: str = "auto",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    candidates: Sequence[str] = AUTO_ORDER,
    need_backward: bool = True,
    head_dim: int = 64,
) -> str:
    """The first backend of `candidates` (from `requested` on, when one is named) that works on `device` in `dtype`.
    Every backend skipped is logged with its reason, and so is the choice; raises if none works."""
    if requested not in ATTN_BACKEND_CHOICES:
        raise ValueError(f"attn_backend={requested!r}; expected one of {ATTN_BACKEND_CHOICES}.")
    order = list(candidates)
    if requested != "auto":
        order = [requested] + [b for b in order if b != requested]
    register_backends()
    reasons = {}
    for backend in order:
        reason = probe_backend(backend, device, dtype, need_backward, head_dim)
        if reason is None:
            key = (backend, str(device), dtype)
            if requested == backend and key in _announced:
                return backend  # chosen before by this process (build_trainer, then the trainer): said once
            _announced.add(key)
            if backend != order[0]:
                logger.warning(
                    "Attention backend %r is not usable on %s (%s); falling back to %r.",
                    order[0], device, "; ".join(f"{b}: {r}" for b, r in reasons.items()), backend,
                )  # fmt: skip
            if backend == "sdpa":
                logger.warning("The sdpa backend builds a dense [T, T] mask per layer: memory grows with T^2.")
            logger.info("Packed attention backend: %s (torch %s, %s, %s).", backend, torch.__version__, device, dtype)
            return backend
        reasons[backend] = reason
    raise RuntimeError(f"No packed attention backend works on {device} in {dtype}: {reasons}")


def _training_dtype_and_head_dim(model, args) -> tuple[torch.dtype, int]:
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else model.dtype
    config = model.config.get_text_config()
    return dtype, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def select_backend_for_model(requested: str, model, args) -> str:
    """`select_backend` for this model's head_dim on the training device, in the training dtype (bf16/fp16 under
    mixed precision). The reference pass and the trainer both call it, so they choose the same backend."""
    dtype, head_dim = _training_dtype_and_head_dim(model, args)
    return select_backend(requested, args.device, dtype, head_dim=head_dim)


def shared_prompt_supported(backend: str, model, args) -> str | None:
    """None when `backend` computes the shared-prompt layout exactly on the training device and dtype (forward and
    backward, full and sliding-window layers), else why not."""
    dtype, head_dim = _training_dtype_and_head_dim(model, args)
    register_backends()
    return probe_backend(backend, args.device, dtype, head_dim=head_dim, shared_prompt=True)


def apply_backend(model, backend: str) -> None:
    """Points `model` (a transformers PreTrainedModel) at `backend`'s registered attention implementation."""
    register_backends()
    model.set_attn_implementation(IMPLEMENTATIONS[backend])
    if model.config._attn_implementation != IMPLEMENTATIONS[backend]:
        raise RuntimeError(
            f"{type(model).__name__} kept attn_implementation={model.config._attn_implementation!r} instead of "
            f"{IMPLEMENTATIONS[backend]!r}; it does not dispatch through transformers' AttentionInterface."
        )
