"""The README's commands cannot drift: each `python -m clipjax...` module it names exists, each
flag is one that module defines, each `--config.FIELD` override is a config field, and each
config file exists."""

import importlib.util
import pathlib
import re
import shlex

import pytest

from clipjax import config as config_lib

ROOT = pathlib.Path(__file__).parent.parent
README = ROOT / "README.md"


def _commands(text: str) -> list[list[str]]:
    """The `python -m clipjax.X ...` commands in the README's code blocks, as words (lines
    continued with a backslash joined; `&&` and `|` end a command)."""
    blocks, block, language = [], None, None
    for line in text.splitlines():
        if line.startswith("```"):
            if block is None:
                block, language = [], line[3:].strip()
            else:
                if language in ("", "bash"):
                    blocks.append("\n".join(block) + "\n")
                block = None
        elif block is not None:
            block.append(line)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            if "python -m clipjax" not in line:
                continue
            words = shlex.split(line, comments=True)
            for start in [
                i for i, w in enumerate(words[:-2]) if w == "python" and words[i + 1] == "-m"
            ]:
                if words[start + 2].startswith("clipjax"):
                    rest = words[start + 2 :]
                    stop = next((i for i, w in enumerate(rest) if w in ("&&", "|", ";")), len(rest))
                    commands.append(rest[:stop])
    return commands


COMMANDS = _commands(README.read_text())


def _source(module: str) -> str:
    spec = importlib.util.find_spec(module)
    assert spec is not None, f"the README runs {module}, which does not exist"
    path = pathlib.Path(spec.origin)
    if path.name == "__init__.py":  # `python -m package` runs its __main__
        path = path.with_name("__main__.py")
    assert path.is_file(), f"python -m {module} has no {path.name}"
    return path.read_text()


def _defined_flags(source: str) -> set[str]:
    return set(re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", source))


def test_the_readme_names_the_commands_users_run():
    modules = {words[0] for words in COMMANDS}
    assert {"clipjax.main", "clipjax.evaluate", "clipjax.export", "clipjax.predict"} <= modules
    assert {"clipjax.report", "clipjax.bench", "clipjax.study", "clipjax.tools.convert"} <= modules


@pytest.mark.parametrize("words", COMMANDS, ids=[" ".join(w)[:60] for w in COMMANDS])
def test_each_readme_command_has_its_module_flags_and_fields(words):
    module, arguments = words[0], words[1:]
    defined = _defined_flags(_source(module))
    base = config_lib.base_config()
    for argument in arguments:
        if not argument.startswith("--"):
            continue
        name, _, value = argument[2:].partition("=")
        if name.startswith("config."):
            assert "config" in defined, f"{module} takes no --config"
            node = base
            for part in name.split(".")[1:]:
                assert part in node, f"{argument}: config has no field {name}"
                node = node[part]
            continue
        assert name in defined, f"{module} defines no --{name}"
        if name == "config":
            assert (ROOT / value.partition(":")[0]).is_file(), f"{argument}: no such config file"
