"""The deployed RL networks: a small MLP, saved as a plain torch ``state_dict`` with metadata.

A policy file is a dict written by :func:`save_policy` and read back with
``torch.load(path, weights_only=True)`` (no unpickling of code). It holds ``format``
(:data:`FORMAT`), ``version`` (:data:`VERSION`), ``kind`` (``tip``, ``dose`` or ``scan``),
``obs_dim``, ``n_actions``, ``hidden`` (layer widths), ``state_dict`` and ``meta`` (training
recipe and results: strings and numbers only). :func:`load_policy` checks every one of them and
raises :class:`~drivers.errors.ModelError` naming what is wrong. Nothing here imports gymnasium
or stable-baselines3: deployment runs on torch alone.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from drivers.errors import ConfigError, DataError, ModelError

FORMAT = "scopepilot-rl-policy"
VERSION = 1
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


class PolicyNet(nn.Module):
    """``obs_dim -> hidden... -> n_actions`` logits, tanh between layers (as SB3's MlpPolicy)."""

    def __init__(self, obs_dim: int, n_actions: int, hidden: Sequence[int] = (64, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = obs_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.Tanh()]
            width = h
        layers.append(nn.Linear(width, n_actions))
        self.layers = nn.Sequential(*layers)
        self.obs_dim = obs_dim
        self.n_actions = n_actions
        self.hidden = tuple(int(h) for h in hidden)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(obs)
        return out

    @torch.no_grad()
    def act(self, obs: np.ndarray, mask: np.ndarray | None = None) -> tuple[int, np.ndarray]:
        """The most probable allowed action and the probabilities over allowed actions.

        ``obs`` is ``(obs_dim,) float32``; ``mask`` ``(n_actions,) bool`` (None: all allowed).
        Raises :class:`DataError` for a wrong shape, non-finite values or an empty mask.
        """
        x = np.asarray(obs, dtype=np.float32)
        if x.shape != (self.obs_dim,):
            raise DataError(f"observation must have shape ({self.obs_dim},), got {x.shape}")
        if not np.all(np.isfinite(x)):
            bad = np.flatnonzero(~np.isfinite(x)).tolist()
            raise DataError(f"observation holds non-finite values at indices {bad}")
        logits = self.forward(torch.from_numpy(x)).numpy().astype(np.float64)
        if mask is not None:
            m = np.asarray(mask, dtype=bool)
            if m.shape != (self.n_actions,):
                raise DataError(f"action mask must have shape ({self.n_actions},), got {m.shape}")
            if not m.any():
                raise DataError("action mask allows no action")
            logits = np.where(m, logits, -np.inf)
        logits -= logits.max()
        probs = np.exp(logits)
        probs /= probs.sum()
        return int(np.argmax(probs)), probs


def save_policy(
    path: str | Path, kind: str, net: PolicyNet, meta: Mapping[str, Any] | None = None
) -> str:
    """Write ``net`` to ``path`` (see the module doc); returns the file's sha256."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "obs_dim": net.obs_dim,
        "n_actions": net.n_actions,
        "hidden": list(net.hidden),
        "state_dict": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
        "meta": dict(meta or {}),
    }
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, target)
    return hashlib.sha256(target.read_bytes()).hexdigest()


def load_policy(
    path: str | Path, *, kind: str, obs_dim: int, n_actions: int
) -> tuple[PolicyNet, dict[str, Any]]:
    """Read a policy file, check it fits (``kind``, shapes, format, version); returns the net
    (in eval mode) and its ``meta`` plus ``sha256``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"policy file {str(p)!r} does not exist; train one with `scopepilot train-policy "
            f"{kind}` or use the shipped weights in {WEIGHTS_DIR}"
        )
    raw = p.read_bytes()
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        raise ModelError(
            f"{p}: not a readable torch weights file ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(payload, Mapping) or payload.get("format") != FORMAT:
        raise ModelError(f"{p}: not a scopepilot RL policy file (format {FORMAT!r} expected)")
    if payload.get("version") != VERSION:
        raise ModelError(
            f"{p}: policy file version {payload.get('version')!r}, this scopepilot reads version "
            f"{VERSION}; retrain with `scopepilot train-policy {kind}`"
        )
    if payload.get("kind") != kind:
        raise ModelError(f"{p}: a {payload.get('kind')!r} policy, not a {kind!r} policy")
    if payload.get("obs_dim") != obs_dim or payload.get("n_actions") != n_actions:
        raise ModelError(
            f"{p}: network shape obs_dim={payload.get('obs_dim')!r}, "
            f"n_actions={payload.get('n_actions')!r}; the {kind} policy needs obs_dim={obs_dim}, "
            f"n_actions={n_actions}"
        )
    hidden = payload.get("hidden")
    if not (
        isinstance(hidden, list) and hidden and all(isinstance(h, int) and h > 0 for h in hidden)
    ):
        raise ModelError(f"{p}: bad hidden layer widths {hidden!r}")
    net = PolicyNet(obs_dim, n_actions, hidden)
    state = payload.get("state_dict")
    if not isinstance(state, Mapping):
        raise ModelError(f"{p}: no state_dict")
    try:
        net.load_state_dict(dict(state))
    except RuntimeError as exc:
        raise ModelError(f"{p}: weights do not fit the network: {exc}") from None
    for name, tensor in net.state_dict().items():
        if not torch.isfinite(tensor).all():
            raise ModelError(f"{p}: weight {name} holds non-finite values")
    net.eval()
    meta = dict(payload.get("meta") or {})
    meta["sha256"] = hashlib.sha256(raw).hexdigest()
    return net, meta


def net_from_sb3(policy: Any, obs_dim: int, n_actions: int) -> PolicyNet:
    """Copy the actor of an SB3/sb3-contrib ``MlpPolicy`` (tanh, separate pi network) into a
    :class:`PolicyNet`. Only attribute access: the caller owns the SB3 import."""
    linears = [m for m in policy.mlp_extractor.policy_net if isinstance(m, nn.Linear)]
    hidden = [m.out_features for m in linears]
    net = PolicyNet(obs_dim, n_actions, hidden)
    targets = [m for m in net.layers if isinstance(m, nn.Linear)]
    sources = [*linears, policy.action_net]
    if len(targets) != len(sources):  # pragma: no cover - guarded by the shapes above
        raise ModelError("SB3 policy and PolicyNet layer counts differ")
    with torch.no_grad():
        for dst, src in zip(targets, sources, strict=True):
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
    net.eval()
    return net


def finite_or_raise(name: str, value: float) -> float:
    """``value`` as a float, or :class:`DataError` naming ``name`` when it is not finite."""
    number = float(value)
    if not math.isfinite(number):
        raise DataError(f"{name} must be finite, got {value!r}")
    return number
