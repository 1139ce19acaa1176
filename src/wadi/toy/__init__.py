"""The embedded miniature of the paper's setting: a digits teacher and evaluator shipped in wadi.

``data`` (sklearn digits at 16x16), ``prompts`` (tiny vocabulary), ``teacher`` (pixel-space
text-conditional U-Net, training), ``evaluator`` (CNN for FD and prompt accuracy),
``evaluate`` (metrics and image grids).
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
TEACHER_DIR = ASSETS / "teacher"
# the same size with attention at the 16x16 level too (SD's layout; docs/ablation.md s. 7)
ATTN_TEACHER_DIR = ASSETS / "teacher-attn"
EVALUATOR_DIR = ASSETS / "evaluator"
