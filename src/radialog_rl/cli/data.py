"""``radialog-rl data``: dataset builders (MIMIC-CXR-JPG 2.0.0 -> the JSONL files sft/ppo read).

Three commands, each a thin wrapper over a function in :mod:`radialog_rl.data.mimic`:
``mimic-table`` (:func:`~radialog_rl.data.mimic.write_master_table`), ``mimic-binary-qa``
(:func:`~radialog_rl.data.mimic.build_binary_qa`) and ``mimic-reports``
(:func:`~radialog_rl.data.mimic.build_report_generation`). Each writes a manifest beside its
output and prints a summary table to stdout.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from radialog_rl.cli.arguments import positive_int

_SPLITS = ("train", "validate", "test")

_DESCRIPTION = """\
Build training and evaluation data from MIMIC-CXR-JPG 2.0.0 in its published layout: ROOT holds
mimic-cxr-2.0.0-split.csv.gz, mimic-cxr-2.0.0-chexpert.csv.gz, mimic-cxr-2.0.0-metadata.csv.gz
(or the unzipped .csv files) and files/pXX/pSUBJECT/sSTUDY/DICOM.jpg; report commands also read
mimic_cxr_sectioned.csv from the MIMIC-CXR code's create_section_files.py (default ROOT/, or
--reports). Every sampling choice is a seeded hash of (subject_id, study_id, dicom_id), so the
same files give the same subset on any machine, whatever the row order. A manifest
(<prefix>.manifest.json: builder version, input sha256s, parameters, row counts) is written next
to the output."""

_EPILOG = """\
examples:
  radialog-rl data mimic-table /data/mimic-cxr-jpg/2.0.0 --out data/mimic_master.jsonl
  radialog-rl data mimic-binary-qa /data/mimic-cxr-jpg/2.0.0 --out data/qa --split train \\
      --n-per-finding 1000 --subsets sft=0.5,ppo=0.5
  radialog-rl data mimic-reports /data/mimic-cxr-jpg/2.0.0 --out data/reports --split train --split test --n 2000
  radialog-rl data mimic-synthetic .cache/mimic-synthetic/mimic-cxr-jpg   # invented data to try it on"""


def _add_common(p: argparse.ArgumentParser, *, frontal_default: bool) -> None:
    p.add_argument("root", type=Path, metavar="ROOT", help="the MIMIC-CXR-JPG 2.0.0 folder")
    p.add_argument("--split", dest="splits", action="append", choices=_SPLITS,
                   help="official split to build (repeatable; default: %s)" % ("train" if frontal_default else "all"))
    if frontal_default:
        p.add_argument("--all-views", dest="frontal_only", action="store_false",
                       help="keep lateral views too (default: frontal AP/PA images only)")
    else:
        p.add_argument("--frontal-only", action="store_true", help="keep only frontal (AP/PA) images")
    if frontal_default:
        p.add_argument("--keep-missing-images", dest="drop_missing_images", action="store_false",
                       help="keep rows whose JPEG is not on disk (default: drop and count them)")
    else:
        p.add_argument("--drop-missing-images", action="store_true",
                       help="drop rows whose JPEG is not on disk (default: keep them, image_exists=false)")
    p.add_argument("--absolute-paths", action="store_true",
                   help="write absolute image paths (default: relative to the output folder)")


def _add_builder_options(p: argparse.ArgumentParser, prefix: str) -> None:
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of every hash-based choice (default 0)")
    p.add_argument("--subsets", metavar="NAME=FRAC,...",
                   help="split each split's subjects by hash into named parts, e.g. sft=0.5,ppo=0.5 "
                        "(files <prefix>_<split>_<name>.*)")
    p.add_argument("--scale", type=int, choices=(10, 100), default=10, help="confidence scale (default 10)")
    p.add_argument("--prefix", default=prefix, help=f"output file prefix (default {prefix})")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data`` and its builders to the ``radialog-rl`` parser."""
    data = subparsers.add_parser(
        "data", help="build training data (MIMIC-CXR-JPG -> JSONL + manifest)", description=_DESCRIPTION,
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = data.add_subparsers(dest="data_command", metavar="BUILDER", required=True)

    table = sub.add_parser("mimic-table", help="master table: one row per image (ids, split, view, labels, "
                                               "findings, image path)", description=_DESCRIPTION)
    _add_common(table, frontal_default=False)
    table.add_argument("--out", required=True, type=Path, metavar="JSONL", help="output JSONL file")
    table.add_argument("--reports", type=Path, metavar="CSV",
                       help="sectioned reports (default ROOT/mimic_cxr_sectioned.csv when present)")
    table.set_defaults(func=run_table)

    qa = sub.add_parser("mimic-binary-qa", help="Rewarding-Doubt binary QA about 13 CheXpert findings "
                                                "(PPO + SFT rows)", description=_DESCRIPTION)
    _add_common(qa, frontal_default=True)
    _add_builder_options(qa, "binary_qa")
    qa.add_argument("--n-per-finding", type=positive_int, default=1000,
                    help="rows per finding per split, half yes / half no (even; default 1000)")
    qa.add_argument("--finding", dest="findings", action="append", metavar="NAME",
                    help="ask only about this CheXpert finding (repeatable; default all 13)")
    qa.set_defaults(func=run_binary_qa)

    rep = sub.add_parser("mimic-reports", help="report generation: findings section as target, RaDialog's "
                                               "prompt (PPO + SFT rows)", description=_DESCRIPTION)
    _add_common(rep, frontal_default=True)
    _add_builder_options(rep, "reports")
    rep.add_argument("--reports", type=Path, metavar="CSV",
                     help="sectioned reports (default ROOT/mimic_cxr_sectioned.csv)")
    rep.add_argument("--n", type=positive_int, help="at most N rows per split (default all)")
    rep.add_argument("--predictions", type=Path, metavar="JSON",
                     help="{dicom_id: [finding, ...]} for the prompt's predicted findings (default: the "
                          "CheXpert labels, as RaDialog trained)")
    rep.add_argument("--all-images", dest="images_per_study", action="store_const", const="all", default="one",
                     help="one row per image of each study (default: one image per study, chosen by hash)")
    rep.set_defaults(func=run_reports)

    syn = sub.add_parser("mimic-synthetic", help="write a synthetic MIMIC-CXR-JPG-shaped tree (invented "
                                                 "subjects, tiny JPEGs; for trying the builders and configs)")
    syn.add_argument("out", type=Path, metavar="DIR", help="where to write the tree")
    syn.add_argument("--subjects", type=positive_int, default=40, help="invented patients (default 40)")
    syn.add_argument("--seed", type=int, default=0, help="seed of the invented data (default 0)")
    syn.set_defaults(func=run_synthetic)


def _finish(result) -> int:
    print(result.summary_table())
    for path in result.files.values():
        print(f"wrote {path}")
    print(f"wrote {result.manifest}")
    return 0


def run_table(args: argparse.Namespace) -> int:
    from radialog_rl.data.mimic import write_master_table

    return _finish(write_master_table(
        args.root, args.out, reports=args.reports, splits=args.splits, frontal_only=args.frontal_only,
        drop_missing_images=args.drop_missing_images, absolute_paths=args.absolute_paths))


def run_binary_qa(args: argparse.Namespace) -> int:
    from radialog_rl.data.mimic import build_binary_qa

    return _finish(build_binary_qa(
        args.root, args.out, splits=args.splits or ("train",), n_per_finding=args.n_per_finding, seed=args.seed,
        subsets=args.subsets, findings=args.findings, frontal_only=args.frontal_only,
        drop_missing_images=args.drop_missing_images, scale=args.scale, absolute_paths=args.absolute_paths,
        prefix=args.prefix))


def run_reports(args: argparse.Namespace) -> int:
    from radialog_rl.data.mimic import build_report_generation

    return _finish(build_report_generation(
        args.root, args.out, reports=args.reports, splits=args.splits or ("train",), n=args.n, seed=args.seed,
        subsets=args.subsets, predictions=args.predictions, images_per_study=args.images_per_study,
        frontal_only=args.frontal_only, drop_missing_images=args.drop_missing_images, scale=args.scale,
        absolute_paths=args.absolute_paths, prefix=args.prefix))


def run_synthetic(args: argparse.Namespace) -> int:
    from radialog_rl.testing.mimic import make_synthetic_mimic

    tree = make_synthetic_mimic(args.out, n_subjects=args.subjects, seed=args.seed)
    print(f"wrote a synthetic MIMIC-CXR-JPG tree to {tree.root}: {len(tree.subjects)} subjects, "
          f"{tree.images} images ({len(tree.missing_images)} image files left out on purpose)")
    return 0
