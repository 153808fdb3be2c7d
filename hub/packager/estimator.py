"""The scikit-learn model being packaged: loading it and finding out what it is.

Outpost packages fitted classifiers and regressors (bare or as the last step of a
Pipeline) that take one numeric feature matrix. `inspect_estimator` is pure and says
what the model is or why it cannot be packaged; `load_estimator` reads the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hub.errors import PackagingError

CLASSIFICATION = "classification"
REGRESSION = "regression"


@dataclass(frozen=True)
class EstimatorInfo:
    """What the packager needs to know about a fitted model."""

    description: str  # e.g. "Pipeline(StandardScaler, MLPClassifier)", for messages
    task: str  # CLASSIFICATION or REGRESSION
    n_features: int | None  # None when the model does not record it
    classes: tuple[Any, ...] = ()  # classifiers: `classes_`, in the model's order
    feature_names: tuple[str, ...] | None = None  # when it was fitted on named columns


def describe(model: object) -> str:
    steps = getattr(model, "steps", None)
    if isinstance(steps, list) and all(isinstance(s, tuple) and len(s) == 2 for s in steps):
        inner = ", ".join(describe(step) for _, step in steps)
        return f"{type(model).__name__}({inner})"
    return type(model).__name__


def inspect_estimator(model: object, source: str) -> EstimatorInfo:
    """Check that `model` is a fitted scikit-learn classifier or regressor and describe it."""
    from sklearn.base import BaseEstimator, is_classifier, is_regressor
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    if not isinstance(model, BaseEstimator):
        raise PackagingError(
            f"{source}: holds a {type(model).__module__}.{type(model).__qualname__}, "
            "not a scikit-learn estimator or pipeline"
        )
    name = describe(model)
    try:
        check_is_fitted(model)
    except NotFittedError:
        raise PackagingError(f"{source}: the {name} is not fitted; fit it, then save it") from None
    if is_classifier(model):
        task = CLASSIFICATION
    elif is_regressor(model):
        task = REGRESSION
    else:
        raise PackagingError(
            f"{source}: unsupported estimator {name}: outpost package handles classifiers and "
            "regressors (the last step must be one)"
        )
    classes: tuple[Any, ...] = ()
    if task == CLASSIFICATION:
        raw = getattr(model, "classes_", None)
        if raw is None or isinstance(raw, list) or getattr(raw, "ndim", 1) != 1:
            raise PackagingError(
                f"{source}: unsupported estimator {name}: multi-output classifiers cannot be "
                "packaged (one target per model)"
            )
        classes = tuple(raw.tolist())
    n_features = getattr(model, "n_features_in_", None)
    names = getattr(model, "feature_names_in_", None)
    return EstimatorInfo(
        description=name,
        task=task,
        n_features=int(n_features) if n_features is not None else None,
        classes=classes,
        feature_names=tuple(str(n) for n in names) if names is not None else None,
    )


def load_estimator(path: Path) -> object:
    """Unpickle a model saved with joblib (or pickle). Loading runs the file's code:
    only package models you trust."""
    import joblib

    if not path.exists():
        raise PackagingError(f"{path}: no such model file")
    if not path.is_file():
        raise PackagingError(f"{path}: is not a file; give the .joblib or .pkl of a fitted model")
    try:
        model: object = joblib.load(path)
    # Unpickling can fail in any way the pickled classes choose (EOFError, KeyError,
    # ModuleNotFoundError, UnpicklingError, ...); all mean "this file is not a model we can load".
    except Exception as exc:
        raise PackagingError(
            f"{path}: cannot load the model ({type(exc).__name__}: {exc}); "
            "save it with joblib.dump(model, path)"
        ) from exc
    return model


def sklearn_predictions(model: Any, x: Any, source: str) -> Any:
    """The model's own predictions on `x`: the reference when the sample has no targets."""
    import warnings

    with warnings.catch_warnings():
        # A model fitted on a DataFrame warns about the missing column names; the sample is a
        # plain matrix by design (the device sends one too), so the warning says nothing here.
        warnings.filterwarnings("ignore", message="X does not have valid feature names")
        try:
            return model.predict(x)
        # predict raises ValueError for NaN, TypeError/AttributeError for broken custom steps.
        except Exception as exc:
            raise PackagingError(
                f"{source}: the model cannot predict the sample ({type(exc).__name__}: {exc})"
            ) from exc
