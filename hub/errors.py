"""The hub's one exception tree (the hub server and the operator CLI `outpost`).

    HubError                        anything the hub or `outpost` reports to a person
    └── PackagingError              `outpost package` cannot turn the model and sample it was
                                    given into a package: unreadable or unsupported model,
                                    malformed sample, bad options, unwritable output

Messages are written for the operator: they say what was wrong and, where it is not
obvious, what to do. Foreign exceptions (scikit-learn, skl2onnx, onnxruntime, OS) are
mapped at the boundary with `raise ... from exc`; the CLI prints `outpost: error: <message>`
and exits 2, never with a traceback.
"""

from __future__ import annotations


class HubError(Exception):
    """Base of every error the hub and the operator CLI raise on purpose."""


class PackagingError(HubError):
    """The model, the sample data or the options given to the packager are unusable."""
