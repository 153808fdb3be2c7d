"""Train a small wine classifier and package it for Outpost.

    python examples/train_example.py [--out out/example]

Trains StandardScaler + MLPClassifier on scikit-learn's bundled wine data (nothing is
downloaded), saves the pipeline with joblib and a held-out sample (with its true class)
as CSV, then runs the same packager as `outpost package`. Writes into OUT:

    wine.joblib, wine-sample.csv      the inputs `outpost package` takes
    wine-1/, wine-1.tar               the package (model.onnx + manifest.json)

`build_example(out_dir)` does the same for the demo and the tests and returns the
package directory. Rerunning replaces the example's earlier package.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from pathlib import Path

NAME = "wine"
VERSION = 1
TARGET = "class"
SEED = 0


def train_and_save(out_dir: Path) -> tuple[Path, Path]:
    """Train the pipeline; write it and its held-out sample CSV. Returns (model, sample)."""
    import joblib
    from sklearn.datasets import load_wine
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    data = load_wine()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=0.4, stratify=data.target, random_state=SEED
    )
    # lbfgs converges on this small, scaled problem in well under a second and without a
    # ConvergenceWarning (the tests treat warnings as errors).
    pipeline = make_pipeline(
        StandardScaler(),
        MLPClassifier(hidden_layer_sizes=(32,), solver="lbfgs", max_iter=2000, random_state=SEED),
    )
    pipeline.fit(x_train, y_train)

    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / f"{NAME}.joblib"
    sample_path = out_dir / f"{NAME}-sample.csv"
    joblib.dump(pipeline, model_path)
    with sample_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([*data.feature_names, TARGET])
        for row, label in zip(x_test.tolist(), y_test.tolist(), strict=True):
            writer.writerow([*row, label])
    return model_path, sample_path


def build_example(out_dir: Path) -> Path:
    """Train, save and package the example; returns the package directory OUT/wine-1."""
    from hub.packager import PackageOptions, build_package

    model_path, sample_path = train_and_save(out_dir)
    report = build_package(
        model_path,
        sample_path,
        PackageOptions(name=NAME, version=VERSION, out_dir=out_dir, target=TARGET, replace=True),
    )
    return report.directory


def remove_previous(out_dir: Path) -> None:
    """Delete the example's own earlier package: the example is rerunnable, while real
    package versions are immutable and `outpost package` refuses to overwrite them."""
    shutil.rmtree(out_dir / f"{NAME}-{VERSION}", ignore_errors=True)
    (out_dir / f"{NAME}-{VERSION}.tar").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train a small wine classifier and package it.")
    parser.add_argument("--out", type=Path, default=Path("out/example"), help="output directory")
    args = parser.parse_args(argv)
    model_path, sample_path = train_and_save(args.out)
    remove_previous(args.out)
    # The operator's command itself, so the example prints what `outpost package` prints.
    from hub.operator_cli import main as outpost

    return outpost(
        [
            "package",
            str(model_path),
            "--sample",
            str(sample_path),
            "--target",
            TARGET,
            "--name",
            NAME,
            "--version",
            str(VERSION),
            "--out",
            str(args.out),
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
