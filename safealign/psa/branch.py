"""The user branch: a second key/value branch over N user tokens in every cross-attention layer.

    tokens = LayerNorm(Linear(u).view(B, N, cross_dim))                 # u: the user vector (B, D)
    out    = Attn(Q, K_txt, V_txt) + scale * W_out Attn(Q, to_k_user(tokens), to_v_user(tokens))

``to_k_user`` / ``to_v_user`` (no bias) are zero-initialised, so an untrained branch adds exactly 0 and renders
are byte-identical to the base model's. The text path is the layer's own processor, called unchanged; the user
term goes through ``to_out`` without its bias (``to_out`` is linear, so this equals PSAlign's adding the two
attention outputs before ``to_out``). It is built on diffusers' attention-processor machinery (as its IP-Adapter
processors add a second key/value branch): the processors are ``nn.Module``s installed with
``set_attn_processor``, so their weights are the denoiser's submodules; the user vector reaches them as the
condition key ``xattn.user`` (``safealign.families.base``: routed as ``cross_attention_kwargs``). Without it, or
with the branch switched off (the reference model of DPO), every layer is its own processor exactly.

With N = 1 the softmax over one key is 1: the branch is a constant per layer and ``to_k_user`` gets no gradient.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from safealign.core.io import atomic_path, safetensors_bytes

USER_KEY = "user"  # the condition key is "xattn.user"


class UserProjection(nn.Module):
    """User vector (B, D) -> N user tokens (B, N, cross_dim): Linear + LayerNorm (PSAlign's projection)."""

    def __init__(self, embed_dim: int, cross_dim: int, n_tokens: int, gate: bool = False) -> None:
        super().__init__()
        self.n_tokens, self.cross_dim = n_tokens, cross_dim
        self.proj = nn.Linear(embed_dim, n_tokens * cross_dim)
        self.norm = nn.LayerNorm(cross_dim)
        # psa.gate: one sigmoid per token read from the user vector, scaling that token's value (0.5 at the start)
        self.gate = nn.Linear(embed_dim, n_tokens) if gate else None
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)
        # fixed standardisation of the user vector (the training users' mean and std; identity until set):
        # sentence embeddings of similar profile texts differ little, so raw differences give small gradients
        self.register_buffer("center", torch.zeros(embed_dim))
        self.register_buffer("spread", torch.ones(embed_dim))

    def standardise_from(self, vectors: torch.Tensor) -> None:
        """Set the standardisation from the training users' vectors (U, D)."""
        self.center.copy_(vectors.mean(0))
        self.spread.copy_(vectors.std(0).clamp_min(1e-6) if len(vectors) > 1 else torch.ones_like(self.spread))

    def standardised(self, user: torch.Tensor) -> torch.Tensor:
        return (user - self.center) / self.spread

    def forward(self, user: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(self.standardised(user)).view(user.shape[0], self.n_tokens, self.cross_dim))

    def gates(self, user: torch.Tensor) -> torch.Tensor | None:
        """(B, N, 1) value gates in (0, 1), or None without ``psa.gate``."""
        if self.gate is None:
            return None
        return torch.sigmoid(self.gate(self.standardised(user))).unsqueeze(-1)


class UserAttnProcessor(nn.Module):
    """Wraps a layer's processor; for a cross-attention layer adds ``scale * Attn(Q, K_user, V_user)``."""

    def __init__(self, base: Any, branch: UserBranch | None, kv_in: int = 0, kv_out: int = 0) -> None:
        super().__init__()
        self.base = base
        self._branch = [branch]  # a list, so the shared branch is not registered once per layer
        # query "tokens": the values edit the prompt's token states (cross_dim), not the attention output
        v_out = kv_in if branch is not None and branch.query == "tokens" else kv_out
        self.to_k_user = nn.Linear(kv_in, kv_out, bias=False) if branch is not None else None
        self.to_v_user = nn.Linear(kv_in, v_out, bias=False) if branch is not None else None
        if branch is not None:
            nn.init.zeros_(self.to_v_user.weight)  # V = 0: the branch adds exactly 0, whatever the keys
            if branch.key_init == "zeros":  # PSAlign's; then to_k_user's first gradients are 0 too
                nn.init.zeros_(self.to_k_user.weight)

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 user: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        branch = self._branch[0]
        active = user is not None and branch is not None and branch.enabled
        if active and branch.query == "tokens":  # the prompt's token states edited, then the layer's own attention
            encoder_hidden_states = self._edit_tokens(attn, branch, encoder_hidden_states, user)
        out = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        if not active or branch.query == "tokens":
            return out
        if hidden_states.ndim != 3 or attn.group_norm is not None or attn.spatial_norm is not None:
            raise ValueError("the user branch supports transformer-block cross-attention (3-d hidden states)")
        b = hidden_states.shape[0]
        # query "text": the user branch reads the hidden states after the text attention, so it sees what the
        # prompt asked for at each position; "hidden": the same queries as the text attention (PSAlign)
        # "prompt": the text attention's output alone, what the prompt asks for at each position without the image
        q = attn.to_q(hidden_states + out if branch.query == "text" else out if branch.query == "prompt"
                      else hidden_states)
        k, v = self._user_kv(branch, user, hidden_states.dtype)
        heads = attn.heads
        hd = k.shape[-1] // heads
        q, k, v = (x.view(b, -1, heads, hd).transpose(1, 2) for x in (q, k, v))  # (B, heads, L, hd)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        u = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, heads * hd)
        lin = attn.to_out[0]
        u = lin(u) - lin.bias if getattr(lin, "bias", None) is not None else lin(u)
        u = attn.to_out[1](u)
        return out + branch.scale * self._for_users(branch, user, u) / attn.rescale_output_factor

    def _user_kv(self, branch: UserBranch, user: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The user tokens' keys and values (B, N [+ 1], dim): ``psa.gate`` scales a token's value by its gate (0 =
        the token adds nothing); ``psa.null_token`` appends a key 0 with a value 0, so a query that matches no user
        key attends to nothing."""
        tokens = branch.projection(user.to(dtype))  # (B, N, cross_dim)
        k, v = self.to_k_user(tokens), self.to_v_user(tokens)
        gates = branch.projection.gates(user.to(dtype))
        if gates is not None:
            v = v * gates
        if branch.null_token:
            k, v = (torch.cat([x, x.new_zeros(x.shape[0], 1, x.shape[-1])], 1) for x in (k, v))
        return k, v

    @staticmethod
    def _for_users(branch: UserBranch, user: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, L, d), zeroed on rows whose user vector is zero (guidance's unconditional side) when
        ``psa.unconditional: off``: no user, no branch."""
        if branch.unconditional != "off":
            return x
        return x * (user != 0).any(-1).to(x.dtype).view(-1, 1, 1)

    def _edit_tokens(self, attn: Any, branch: UserBranch, states: torch.Tensor, user: torch.Tensor) -> torch.Tensor:
        """``psa.query: tokens``: each prompt token attends to the user tokens (its query: the layer's own text key
        ``to_k(e)``; single head) and the result is added to the token's state before the layer's text attention:
        ``e' = e + scale * Attn(to_k(e), to_k_user(T), to_v_user(T))``, so a user can change what a word means to
        this layer (as UCE edits a concept word's keys and values, but per user). ``to_v_user`` = 0: ``e' = e``."""
        k, v = self._user_kv(branch, user, states.dtype)
        d = F.scaled_dot_product_attention(attn.to_k(states).unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return states + branch.scale * self._for_users(branch, user, d)


class UserBranch(nn.Module):
    """The trainable parts: the projection and each cross-attention layer's user key/value."""

    def __init__(self, embed_dim: int, cross_dim: int, n_tokens: int, scale: float, key_init: str = "zeros",
                 query: str = "hidden", null_token: bool = False, unconditional: str = "zeros",
                 gate: bool = False) -> None:
        super().__init__()
        if unconditional not in ("zeros", "off"):
            raise ValueError(f"the user branch's unconditional side must be 'zeros' or 'off', got {unconditional!r}")
        if query not in ("hidden", "text", "prompt", "tokens"):
            raise ValueError(f"the user branch's query must be 'hidden', 'text', 'prompt' or 'tokens', got {query!r}")
        self.embed_dim, self.n_tokens, self.scale, self.key_init = embed_dim, n_tokens, scale, key_init
        self.query, self.null_token, self.unconditional, self.gate = query, null_token, unconditional, gate
        self.projection = UserProjection(embed_dim, cross_dim, n_tokens, gate)
        self.layers = nn.ModuleDict()
        self.enabled = True
        self._old: dict[str, Any] | None = None

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The reference model: every layer its own processor alone."""
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    def user_parameters(self, which: str = "all") -> list[nn.Parameter]:
        if which == "k":
            return [m.to_k_user.weight for m in self.layers.values()]
        return list(self.parameters())


def attach_branch(unet: Any, embed_dim: int, n_tokens: int, scale: float, seed: int = 0,
                  key_init: str = "zeros", query: str = "hidden", null_token: bool = False,
                  unconditional: str = "zeros", gate: bool = False) -> UserBranch:
    """Install a user branch on every cross-attention layer of ``unet`` (a diffusers UNet): ``to_v_user`` zero,
    ``to_k_user`` zero (``key_init="zeros"``, PSAlign) or nn.Linear's random init (``"random"``: the keys tell
    queries apart from the first step). ``gate``: a sigmoid gate per token on its value (``psa.gate``). The
    random inits come from ``seed``."""
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        branch = UserBranch(embed_dim, unet.config.cross_attention_dim, n_tokens, scale, key_init, query,
                            null_token, unconditional, gate)
        old = unet.attn_processors
        procs = {}
        modules = dict(unet.named_modules())
        for name, proc in old.items():
            attn = modules[name.removesuffix(".processor")]
            if attn.is_cross_attention:
                p = UserAttnProcessor(proc, branch, attn.cross_attention_dim, attn.to_k.out_features)
                p._attn = [attn]  # the layer it serves (a list: not registered as a submodule)
                branch.layers[name.replace(".", "__")] = p
            else:
                p = UserAttnProcessor(proc, None)
            procs[name] = p
    unet.set_attn_processor(procs)
    param = next(unet.parameters())
    branch.to(param.device)
    branch._old = old
    return branch


def token_edits(branch: UserBranch, states: torch.Tensor, user: torch.Tensor) -> Iterator[tuple[Any, torch.Tensor]]:
    """``psa.query: tokens``: each cross-attention layer (the diffusers ``Attention``) with the prompt's token
    states as that layer's branch edits them for ``user`` (``_edit_tokens``), without running the denoiser."""
    if branch.query != "tokens":
        raise ValueError(f"token edits need the branch's query 'tokens', got {branch.query!r}")
    for proc in branch.layers.values():
        attn = proc._attn[0]
        yield attn, proc._edit_tokens(attn, branch, states, user)


def detach_branch(unet: Any, branch: UserBranch) -> None:
    """Give every layer its own processor back."""
    unet.set_attn_processor(branch._old)


def save_branch(path: Path, branch: UserBranch, **meta: str) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in branch.state_dict().items()}
    info = {"embed_dim": str(branch.embed_dim), "n_tokens": str(branch.n_tokens), "scale": repr(branch.scale),
            "key_init": branch.key_init, "query": branch.query, "null_token": str(branch.null_token).lower(),
            "unconditional": branch.unconditional, "gate": str(branch.gate).lower(),
            "layers": json.dumps(sorted(branch.layers)), **meta}
    with atomic_path(Path(path)) as tmp:
        tmp.write_bytes(safetensors_bytes(tensors, info))


def load_branch(path: Path, unet: Any) -> tuple[UserBranch, dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: the user branch is missing; run `dvc repro align` with method psa")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    branch = attach_branch(unet, int(meta["embed_dim"]), int(meta["n_tokens"]), float(meta["scale"]),
                           query=meta.get("query", "hidden"), null_token=meta.get("null_token") == "true",
                           unconditional=meta.get("unconditional", "zeros"), gate=meta.get("gate") == "true")
    if sorted(branch.layers) != json.loads(meta["layers"]):
        detach_branch(unet, branch)
        raise ValueError(f"{path}: the branch was trained for other cross-attention layers than this model's")
    branch.load_state_dict(load_file(str(path)))
    branch.requires_grad_(False)
    return branch, meta


class UserFamily:
    """A family seen through the user branch: prompts are encoded with the user vector (``xattn.user``), the
    unconditional side with the zero vector (PSAlign: the projection of zeros), and the reference model of DPO
    (``adapters_disabled``) is the branch switched off. Everything else is the wrapped family's."""

    def __init__(self, fam: Any, branch: UserBranch, user: torch.Tensor | None = None) -> None:
        self._fam, self.branch, self.user = fam, branch, user

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fam, name)

    def with_user(self, user: torch.Tensor | None) -> UserFamily:
        return UserFamily(self._fam, self.branch, user)

    def _users(self, n: int, zero: bool = False) -> torch.Tensor:
        d = self.branch.embed_dim
        u = torch.zeros(d) if zero or self.user is None else self.user.reshape(d)
        return u.to(self._fam.device, torch.float32).expand(n, d)

    def encode_prompts(self, prompts: Any) -> dict[str, torch.Tensor]:
        cond = self._fam.encode_prompts(prompts)
        return {**cond, "xattn." + USER_KEY: self._users(len(prompts))}

    def empty_cond(self, n: int) -> dict[str, torch.Tensor]:
        return {**self._fam.empty_cond(n), "xattn." + USER_KEY: self._users(n, zero=True)}

    def adapters_disabled(self) -> contextlib.AbstractContextManager[None]:
        return self.branch.disabled()

    def render(self, prompts: Any, seeds: Any, steps: int, guidance: float, batch_size: int = 64,
               progress: bool = False, combine: Any = None) -> Any:
        from safealign.families.sampling import ddim_render

        return ddim_render(self, prompts, seeds, steps, guidance, batch_size, progress, combine)
