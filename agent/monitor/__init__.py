"""Monitor: drift statistics over binned counts (pure; see `drift`)."""

from agent.monitor.drift import (
    DriftDetector,
    WindowVerdict,
    binned_ks,
    bridge_max_sf,
    chi2_sf,
    chi_square,
    correct,
    kolmogorov_sf,
    ks_p_value,
    merge_sparse_bins,
    psi,
)

__all__ = [
    "DriftDetector",
    "WindowVerdict",
    "binned_ks",
    "bridge_max_sf",
    "chi2_sf",
    "chi_square",
    "correct",
    "kolmogorov_sf",
    "ks_p_value",
    "merge_sparse_bins",
    "psi",
]
