"""MIMIC-CXR-JPG 2.0.0 dataset builders: master table, binary QA, report generation.

* :mod:`.tables`: reading the published CSVs (``.csv`` or ``.csv.gz``) and the sectioned
  reports, and :func:`build_master_table` (one row per image);
* :mod:`.selection`: seeded-hash sampling and subject-level subsets (order- and
  library-independent);
* :mod:`.binary_qa` / :mod:`.reports`: the two tasks' PPO and SFT JSONL files;
* :mod:`.outputs`: JSONL, manifest (builder version, input sha256s, parameters) and summary;
* :mod:`.master`: the master table written out as JSONL.

The command line is ``radialog-rl data mimic-table | mimic-binary-qa | mimic-reports``.
"""

from radialog_rl.data.mimic.binary_qa import QA_FINDINGS, build_binary_qa
from radialog_rl.data.mimic.master import write_master_table
from radialog_rl.data.mimic.outputs import BUILDER_VERSION, BuildResult
from radialog_rl.data.mimic.reports import build_report_generation, read_predictions_file
from radialog_rl.data.mimic.tables import MasterTable, MimicError, MimicImage, build_master_table

__all__ = [
    "BUILDER_VERSION",
    "BuildResult",
    "MasterTable",
    "MimicError",
    "MimicImage",
    "QA_FINDINGS",
    "build_binary_qa",
    "build_master_table",
    "build_report_generation",
    "read_predictions_file",
    "write_master_table",
]
