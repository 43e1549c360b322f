"""pgpo: Physics-Guided Policy Optimization (self-distillation with an information-modulated step).

The core is split so that each import stays light:

- :mod:`pgpo.multiplier` (NumPy only): rho(I) of Eq. 9, its derivative, bounds, Lipschitz constant;
- :mod:`pgpo.information` (torch): the entropy-gap signal I_k of Eq. 8;
- :mod:`pgpo.distill` (torch): the per-token divergences of SDPO's distillation loss;
- :mod:`pgpo.optim` (torch): :class:`~pgpo.optim.ModulatedOptimizer`.
"""

from pgpo.multiplier import MultiplierConfig, rho

__version__ = "0.1.0"
__all__ = ["MultiplierConfig", "rho", "__version__"]
