"""The one interface every diffusion model is seen through.

Calling convention (all backbones):
- ``x`` is a *state*: the tensor the diffusion runs on, shape (B, *state_shape): pixels in [-1, 1]
  for pixel models, scaled VAE latents for latent models. ``to_state`` / ``to_image`` convert.
- ``t`` is an integer timestep on the training grid 0..T-1: a Python int or an integer tensor of
  shape () or (B,). Float timesteps are refused (a classic silent bug: 999.0 vs 999).
- ``cond`` is a :class:`Conditioning` or None (unconditional / empty prompt).
- ``eps`` always returns ε, whatever the model predicts natively (v and x0 are converted).
- ``h`` is the bottleneck: the mid-block output, computed without running the decoder.
- ``encode`` returns the bottleneck *and* the encoder's skip tensors, so ``eps_from_h`` re-runs only
  the decoder: the cheap way to differentiate with respect to h (h-space edits, RBE).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from diffgeo.errors import InputError
from diffgeo.io.regions import area_resize, as_mask
from diffgeo.schedule import GridRule

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def prepare_module(module: torch.nn.Module, device: torch.device,
                   dtype: torch.dtype) -> torch.nn.Module:
    """Frozen, eval mode, on device; cast only when needed (diffusers warns on needless casts)."""
    p = next(module.parameters(), None)
    if p is not None and p.dtype != dtype:
        module = module.to(dtype=dtype)
    return module.to(device).eval().requires_grad_(False)


@dataclass(frozen=True)
class Conditioning:
    """What a conditional model needs besides (x, t); None fields mean 'not used'.

    ``added`` holds extra conditioning such as SDXL's ``text_embeds``/``time_ids``, passed through
    to the U-Net as ``added_cond_kwargs``; callers never need to know it exists.
    """

    encoder_hidden_states: torch.Tensor | None = None
    added: dict[str, torch.Tensor] = field(default_factory=dict)
    class_labels: torch.Tensor | None = None
    prompt: str | None = None

    def expand(self, batch: int) -> Conditioning:
        """Broadcast a batch-1 conditioning to ``batch`` (a no-op when sizes already agree)."""

        def ex(v: torch.Tensor | None) -> torch.Tensor | None:
            if v is None or v.shape[0] == batch:
                return v
            if v.shape[0] != 1:
                raise InputError(
                    f"cond: batch of {v.shape[0]} cannot be broadcast to a batch of {batch}"
                )
            return v.expand(batch, *v.shape[1:])

        return replace(
            self,
            encoder_hidden_states=ex(self.encoder_hidden_states),
            added={k: ex(v) for k, v in self.added.items()},
            class_labels=ex(self.class_labels),
        )


@dataclass
class Encoded:
    """The encoder half of one U-Net evaluation: everything the decoder needs besides h."""

    h: torch.Tensor
    skips: tuple[torch.Tensor, ...]
    emb: torch.Tensor
    timesteps: torch.Tensor
    x: torch.Tensor
    cond: Conditioning | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BackboneSummary:
    kind: str
    name: str
    image_size: tuple[int, int]
    state_shape: tuple[int, ...]
    h_shape: tuple[int, ...]
    num_train_timesteps: int
    prediction_type: str
    parameters: int
    dtype: str
    device: str
    conditional: bool

    def lines(self) -> list[str]:
        return [f"{k}: {v}" for k, v in self.__dict__.items()]


class Backbone(ABC):
    """A diffusion model seen as ε(x, t), its bottleneck h(x, t) and a state <-> image map."""

    kind: str = "abstract"
    name: str = ""
    prediction_type: str = "epsilon"
    conditional: bool = False
    #: How the model's scheduler lays out a sampling grid (spacing, offset, clean-end
    #: alpha_bar); the loader reads it from the scheduler config, sampling.Grid uses it.
    grid_rule: GridRule = GridRule()

    def __init__(self, alphas_cumprod: torch.Tensor, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu()
        if ac.ndim != 1 or len(ac) < 2:
            raise InputError("alphas_cumprod must be a 1-D sequence of at least 2 values")
        if not bool(((ac > 0) & (ac <= 1)).all()) or not bool((ac[1:] <= ac[:-1]).all()):
            raise InputError("alphas_cumprod must lie in (0, 1] and be non-increasing")
        self.alphas_cumprod = ac
        self.device = torch.device(device)
        self.dtype = dtype

    # ------------------------------------------------------------------ shapes and checks
    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    @abstractmethod
    def state_shape(self) -> tuple[int, ...]: ...

    @property
    @abstractmethod
    def image_size(self) -> tuple[int, int]: ...

    def timesteps(self, t: int | torch.Tensor, batch: int) -> torch.Tensor:
        """Validate ``t`` and return it as a long tensor of shape (batch,) on the model device."""
        if isinstance(t, bool):
            raise InputError(f"t must be an integer timestep, got {t!r}")
        if isinstance(t, torch.Tensor):
            if t.is_floating_point() or t.is_complex():
                raise InputError(f"t must be an integer timestep, got a {t.dtype} tensor "
                                 "(float timesteps are refused: use the integer training grid)")
            tt = t.to(torch.long).reshape(-1)
        elif isinstance(t, int) or (hasattr(t, "__index__") and not isinstance(t, float)):
            tt = torch.tensor([int(t)], dtype=torch.long)
        else:
            raise InputError(f"t must be an integer timestep, got {type(t).__name__} {t!r}")
        if tt.numel() == 1:
            tt = tt.expand(batch)
        if tt.numel() != batch:
            raise InputError(f"t has {tt.numel()} entries for a batch of {batch}")
        T = self.num_train_timesteps
        if int(tt.min()) < 0 or int(tt.max()) >= T:
            raise InputError(f"t must lie in 0..{T - 1}, got {tt.tolist()}")
        return tt.to(self.device)

    def check_state(self, x: torch.Tensor, name: str = "x") -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if tuple(x.shape[1:]) != tuple(self.state_shape) or x.ndim != len(self.state_shape) + 1:
            raise InputError(f"{name} must have shape (B, {', '.join(map(str, self.state_shape))})"
                             f", got {tuple(x.shape)}")
        return x

    def state_region(self, mask: Any, name: str = "region") -> torch.Tensor:
        """A region drawn on the model's image (H, W), 1 = region, on the state grid:
        (1, 1, h, w) area-averaged (``diffgeo.io.regions``' rule for regions on the state
        grid), in this backbone's dtype and device."""
        m = as_mask(mask, self.image_size, name)[None, None]
        return area_resize(m, self.state_shape[-2:]).to(device=self.device, dtype=self.dtype)

    def to_eps(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Convert the model's native prediction to ε.

        The coefficients are formed in float64 and cast once: near t = 0, 1 − ᾱ is a small
        difference of numbers close to 1, which float32 would round to a few digits.
        """
        if self.prediction_type == "epsilon":
            return out
        a = self.alphas_cumprod[torch.as_tensor(t).cpu()].reshape(-1, *([1] * (x.ndim - 1)))

        def cast(c: torch.Tensor) -> torch.Tensor:
            return c.to(device=x.device, dtype=x.dtype)

        if self.prediction_type == "v_prediction":
            return cast(a.sqrt()) * out + cast((1 - a).sqrt()) * x
        if self.prediction_type == "sample":
            return cast(1 / (1 - a).sqrt()) * x - cast((a / (1 - a)).sqrt()) * out
        raise InputError(f"prediction_type must be one of {PREDICTION_TYPES}, "
                         f"got {self.prediction_type!r}")

    # ------------------------------------------------------------------ the model
    @abstractmethod
    def encode(self, x: torch.Tensor, t: int | torch.Tensor,
               cond: Conditioning | None = None) -> Encoded:
        """Run the encoder (time embedding, input conv, down blocks, mid block)."""

    @abstractmethod
    def decode(self, enc: Encoded, h: torch.Tensor,
               return_features: bool = False) -> torch.Tensor | tuple[torch.Tensor, list]:
        """Run the decoder from the bottleneck ``h`` with ``enc``'s skips: native prediction."""

    def native(self, x: torch.Tensor, t: int | torch.Tensor,
               cond: Conditioning | None = None) -> torch.Tensor:
        """The model's own output (ε, v or x0); backbones override with a faster full pass."""
        enc = self.encode(x, t, cond)
        return self.decode(enc, enc.h)

    def eps(self, x: torch.Tensor, t: int | torch.Tensor,
            cond: Conditioning | None = None) -> torch.Tensor:
        self.check_state(x)
        tt = self.timesteps(t, x.shape[0])
        return self.to_eps(self.native(x, tt, cond), x, tt)

    def h(self, x: torch.Tensor, t: int | torch.Tensor,
          cond: Conditioning | None = None) -> torch.Tensor:
        self.check_state(x)
        return self.encode(x, t, cond).h

    def eps_from_h(self, x: torch.Tensor, t: int | torch.Tensor, h: torch.Tensor,
                   cond: Conditioning | None = None, encoded: Encoded | None = None
                   ) -> torch.Tensor:
        """ε with the bottleneck replaced by ``h``; pass ``encoded`` to reuse cached skips."""
        self.check_state(x)
        enc = encoded if encoded is not None else self.encode(x, t, cond)
        if tuple(h.shape) != tuple(enc.h.shape):
            raise InputError(f"h must have shape {tuple(enc.h.shape)}, got {tuple(h.shape)}")
        return self.to_eps(self.decode(enc, h), enc.x, enc.timesteps)

    def features(self, x: torch.Tensor, t: int | torch.Tensor,
                 cond: Conditioning | None = None) -> list[torch.Tensor]:
        """Decoder feature maps (the output of every up block), for feature-alignment losses."""
        self.check_state(x)
        enc = self.encode(x, t, cond)
        _, feats = self.decode(enc, enc.h, return_features=True)
        return feats

    # ------------------------------------------------------------------ images
    def to_state(self, image: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1], (B, C, H, W) -> state. Identity for pixel models."""
        return image

    def to_image(self, state: torch.Tensor) -> torch.Tensor:
        return state

    def condition(self, prompt: str | None = None, **kwargs: Any) -> Conditioning | None:
        """Conditioning for a prompt (None for unconditional models)."""
        if prompt:
            raise InputError(f"this {self.kind} model is unconditional: it takes no prompt")
        return None

    # ------------------------------------------------------------------ autodiff
    @contextlib.contextmanager
    def derivative_mode(self) -> Iterator[None]:
        """Make forward- and reverse-mode AD work through the network (DESIGN.md §3).

        Plain forward passes keep the fast kernels; inside this block attention runs in the math
        form (no forward AD exists for the fused CPU kernels) and GroupNorm inputs are made
        contiguous (forward AD through GroupNorm fails on non-contiguous tangents).
        """
        yield

    def parameters_count(self) -> int:
        return 0

    def h_shape(self) -> tuple[int, ...]:
        """Shape of h for one sample (one encoder pass on zeros, cached)."""
        cached = getattr(self, "_h_shape", None)
        if cached is None:
            with torch.no_grad():
                x = torch.zeros(1, *self.state_shape, device=self.device, dtype=self.dtype)
                cached = self._h_shape = tuple(self.encode(x, 0).h.shape[1:])
        return cached

    @property
    def summary_kind(self) -> str:
        return self.kind

    def summary(self) -> BackboneSummary:
        return BackboneSummary(
            kind=self.summary_kind, name=self.name, image_size=tuple(self.image_size),
            state_shape=tuple(self.state_shape), h_shape=self.h_shape(),
            num_train_timesteps=self.num_train_timesteps, prediction_type=self.prediction_type,
            parameters=self.parameters_count(), dtype=str(self.dtype).replace("torch.", ""),
            device=str(self.device), conditional=self.conditional,
        )
