"""Region-based editing (RBE): unsupervised h-space directions for one image region.

The method (the RBE paper, Eq. 11-14, with Asyrp's editing process):

1. **Where.** Invert the image with DDIM to t (default 500, 40 steps over T, eta 0) and take the
   state X_t. Discovery and editing use the *same* integer grid (a ``sampling.Grid``), so the
   state the directions were found at is the state the edit starts from.
2. **What is differentiated.** f(h) = ε(X_t, h): the noise prediction with the bottleneck
   (mid-block output) replaced by h. The encoder does not depend on h, so f is the *decoder* run
   on the encoder's cached skip tensors (``Backbone.encode`` once, then ``decode(enc, h)``,
   converted to ε with ``to_eps``) — the same function the authors' code evaluates with a full
   U-Net pass per product and a hook on the mid block. The saving is the encoder's forward pass
   per product (no tangent flows through it either way): 15-17% of a discovery on the default
   32x32 model, one CPU thread (``benchmarks/rbe_discovery.py``); more where the encoder is a
   larger share of the network.
3. **Masked Jacobians** (Eq. 11-12). J_M = ∂(M ⊙ ε)/∂h and J_U = ∂((1 - M) ⊙ ε)/∂h, with M the
   region mask on the *state* grid. Rule: the image mask (1 = region) is area-averaged onto the
   state's spatial grid (``F.interpolate(mode="area")``; the identity for pixel models, an 8x8
   average for SD latents) and broadcast over channels, so a soft mask weights ε by the fraction
   of each state cell that lies in the region.
4. **Directions.** The k leading right singular vectors of J_M and k_u of J_U, by block power
   iteration on JᵀJ (``tangent.block_power_iteration``: JVPs and VJPs through the decoder only,
   ``torch.func.jvp``/``vjp`` inside ``backbone.derivative_mode()``; QR every pass, a residual
   test with a Davis–Kahan bound on the angle to the exact directions, the sign convention
   "largest |component| positive"; options in one :class:`RBEConfig`, a
   ``tangent.PowerIterationConfig`` with RBE's own fields). Singular
   values are those of J_M itself (ε-units per unit of h).
5. **Projection** (Eq. 14). v' = v - (v·u₁) u₁ against the leading unmasked vector u₁, as the
   paper writes it (``project_against="leading"``), then normalised; ``"subspace"`` removes the
   whole top-k_u unmasked subspace (a stated extension: J_U usually has several directions of
   similar strength, and removing only the first leaves the others in v'); ``"none"`` keeps v
   (the Semdiff-style masked baseline). Each v' keeps the orientation of its v (v'·v > 0), so
   strengths mean the same thing before and after projection. Projected vectors are unit but not
   mutually orthogonal (each is projected on its own, as in the paper).
6. **Editing** (Asyrp's asymmetric reverse process, the paper's Eq. 1-3). At every generation
   step inside the edit window the encoder runs once on the *current* state (no one-step-lagged
   h), and the decoder twice: ε_edit from h + α·v, ε_orig from h. The DDIM step is
   x_{t-1} = sqrt(ab_{t-1})·P_t(ε_edit) + D_t(ε_orig): the edit enters the x̂0 prediction only,
   the direction term keeps the unedited ε (``mode="x0"``, the paper). ``mode="replace"`` uses
   ε_edit in both terms, as the authors' released code does; by Asyrp's Theorem 1 this mostly
   cancels the edit. Outside the window the step is plain DDIM.

Edit window: the paper's main text only says the edited timesteps are "set" (details are in an
appendix we do not have). Directions are found at t_edit alone and the paper argues h-space is
consistent across timesteps, so the default edits every step of the generation from t_edit down
to t = 0 (``window=(0, t_edit)``). A narrower window ``(t_low, t_high)`` edits only steps whose
starting timestep lies in it; steps *below* t_low may then use ``eta`` > 0 (Asyrp's "quality
boosting" by stochastic noise injection), which needs an explicit generator.

Layout: ``config`` (defaults, :class:`RBEConfig`, :class:`RBEEditConfig`, input checks),
``products`` (decoder Jacobian products, projection, response), ``directions`` (the result and
its files), ``discovery`` (steps 1-5), ``apply`` (step 6).

Conventions: states (1, *state_shape) in the backbone's dtype; h-vectors (k, *h_shape), unit
norm when flattened; timesteps are integers on the training grid; every random draw takes a
``torch.Generator`` (default: a fresh one seeded 0), so the same call gives the same result.
"""

from diffgeo.editing.rbe.apply import EditResult, apply_direction, asymmetric_step
from diffgeo.editing.rbe.config import (
    DEFAULT_K,
    DEFAULT_STEPS,
    DEFAULT_STRENGTH,
    DEFAULT_T,
    MASK_RULE,
    MODES,
    PROJECTIONS,
    RBEConfig,
    RBEEditConfig,
    state_mask,
)
from diffgeo.editing.rbe.directions import Directions
from diffgeo.editing.rbe.discovery import directions_at, discover_directions, global_directions
from diffgeo.editing.rbe.products import decoder_products, masked_response, project_out

__all__ = [
    "DEFAULT_K", "DEFAULT_STEPS", "DEFAULT_STRENGTH", "DEFAULT_T", "MASK_RULE", "MODES",
    "PROJECTIONS", "Directions", "EditResult", "RBEConfig", "RBEEditConfig", "apply_direction",
    "asymmetric_step", "decoder_products", "directions_at", "discover_directions",
    "global_directions", "masked_response", "project_out", "state_mask",
]
