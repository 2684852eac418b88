"""The README's examples stay true: its APDU script and Python snippet run as shown."""

from __future__ import annotations

from pathlib import Path

from reader_sim.link import InMemoryLink
from reader_sim.script import parse_script, run_script
from tests.helpers import new_card

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _code_blocks(language: str = "") -> list[str]:
    """Fenced blocks opened with exactly ```LANGUAGE, read line by line so that a closing
    fence is never taken for an opening one."""
    blocks, current, inside = [], [], None
    for line in README.splitlines():
        if line.startswith("```"):
            if inside is None:
                inside, current = line[3:].strip(), []
            else:
                if inside == language:
                    blocks.append("\n".join(current) + "\n")
                inside = None
        elif inside is not None:
            current.append(line)
    return blocks


def test_the_readme_apdu_script_runs_clean_on_a_card_with_1000_fen() -> None:
    script = next(block for block in _code_blocks() if block.startswith("00 A4"))
    results = run_script(InMemoryLink(new_card(balance_fen=1000)), parse_script(script))
    assert len(results) == 3 and all(result.matches for result in results)


def test_the_readme_python_example_runs(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    example = next(block for block in _code_blocks("python"))
    namespace: dict[str, object] = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert (tmp_path / "phone.json").exists()
