"""README and the accuracy history name settings, files and tests; these checks keep the names true.

Users copy `key=value` settings and paths out of README; a renamed key or a moved file would otherwise only show
when someone's command fails. The accuracy history (`benchmarks/results/accuracy_history.md`) is cited by pass
from code comments and presets, so each cited pass must have its section there.
"""
from __future__ import annotations

import glob
import re
from pathlib import Path

from scan_dist import config

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
HISTORY = ROOT / "benchmarks" / "results" / "accuracy_history.md"

_SECTIONS = "|".join(sorted({key.split(".")[0] for key in config._VALID_KEYS if "." in key}))
# `scan.epochs=30`, `mine.pixel_weight`, `selflabel.teacher_flip=true`, inside a code span of README.
_SETTING = re.compile(rf"(?<![\w./-])((?:{_SECTIONS})\.[a-z_]+(?:\.[a-z_]+)*)(?==|[`\s,)])")
# A path up to its end; a template such as `tests/test_<module>.py` is no path and matches nothing.
_REPO_PATH = re.compile(r"(?<![\w./-])((?:scan_dist|benchmarks|tests|slurm|kernels|\.ci)/[\w./*:-]*[\w*])(?![\w./*:<-])")
_PASS_CITATION = re.compile(r"accuracy_history\.md,?\s+(?:#\s*)?(\w+)\s+pass")


def _code_spans(text: str) -> list[str]:
    spans = re.findall(r"`([^`\n]+)`", text)
    spans += re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.DOTALL)
    return spans


_FILE_SUFFIXES = {"conf", "json", "yaml", "yml", "md", "py", "txt", "log", "sh"}  # `slurm.conf` is a file


def _settings_named(text: str) -> set[str]:
    return {m.group(1) for span in _code_spans(text) for m in _SETTING.finditer(span + " ")
            if m.group(1).rsplit(".", 1)[1] not in _FILE_SUFFIXES}


def test_every_setting_readme_names_is_a_config_key():
    named = _settings_named(README.read_text())
    assert len(named) > 40, "the pattern no longer finds README's settings"
    unknown = sorted(key for key in named if key not in config._VALID_KEYS)
    assert not unknown, f"README names settings the config does not have: {unknown}"


def test_the_setting_check_catches_a_misspelt_key():
    assert _settings_named("run `demo scan.epoch=30` and `mine.k`") == {"scan.epoch", "mine.k"}
    assert "scan.epoch" not in config._VALID_KEYS


def _paths_named(text: str) -> set[str]:
    spans = _code_spans(text) + re.findall(r"\]\(([^)\s]+)\)", text)
    return {m.group(1) for span in spans for m in _REPO_PATH.finditer(span)}


def _missing(path: str) -> str | None:
    file_part, _, test_name = path.partition("::")
    matches = glob.glob(str(ROOT / file_part))
    if not matches:
        return path
    if test_name and not any(f"def {test_name.split('[')[0]}(" in Path(m).read_text() for m in matches):
        return path
    return None


def test_every_repository_path_readme_names_exists():
    named = _paths_named(README.read_text())
    assert len(named) > 20, "the pattern no longer finds README's paths"
    missing = sorted(filter(None, map(_missing, named)))
    assert not missing, f"README names files or tests that are not in the repository: {missing}"


def test_the_path_check_catches_a_moved_file_and_a_renamed_test():
    assert _missing("benchmarks/results/accuracy_history.md") is None
    assert _missing("benchmarks/results/ablation_demo-cpu-*.md") is None
    assert _missing("tests/test_readme.py::test_every_repository_path_readme_names_exists") is None
    assert _missing("benchmarks/results/no_such_report.md") == "benchmarks/results/no_such_report.md"
    assert _missing("tests/test_readme.py::test_gone") == "tests/test_readme.py::test_gone"


def test_every_pass_cited_from_code_has_its_section_in_the_history():
    sources = [*ROOT.glob("scan_dist/**/*.py"), *ROOT.glob("scan_dist/presets/*.yaml"),
               *ROOT.glob("benchmarks/*.py"), README]
    cited = {(source.relative_to(ROOT).as_posix(), match.group(1))
             for source in sources for match in _PASS_CITATION.finditer(source.read_text())}
    assert len(cited) >= 5, "the pattern no longer finds the citations"
    history = HISTORY.read_text()
    absent = sorted((where, which) for where, which in cited
                    if f"**Every stage earns its place, {which} pass" not in history)
    assert not absent, f"cited passes without a section in {HISTORY.name}: {absent}"
