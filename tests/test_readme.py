"""The README's command lines use flags their tools have: a renamed or dropped flag fails here, not on a user's
cluster after the job was queued."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS = {"opd.py": ["opd.py"], "eval.py": ["eval.py"], "flops.py": ["flops.py"],
         "kernels.bench_step": ["-m", "kernels.bench_step"], "kernels.bench": ["-m", "kernels.bench"]}


def commands():
    """(tool, flags) of every README line that runs one of TOOLS: in code blocks (continued lines joined) and in
    inline code such as `python flops.py --paper`."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    inline = re.findall(r"`((?:python|torchrun) [^`]*)`", re.sub(r"```.*?```", "", text, flags=re.S))
    for line in "\n".join(blocks + inline).replace("\\\n", " ").splitlines():
        line = line.split("#")[0]
        tool = next((t for t in TOOLS if re.search(rf"(^|[ /]){re.escape(t)}( |$)", line)), None)
        if tool:
            yield tool, re.findall(r"(?<![\w-])--[a-z][\w-]*", line.split(tool, 1)[1])


def test_readme_commands_use_existing_flags():
    found = list(commands())
    assert {t for t, _ in found} == set(TOOLS), found  # the parse above still finds every tool's commands
    helps = {t: subprocess.run([sys.executable, *argv, "--help"], cwd=ROOT, capture_output=True, text=True).stdout
             for t, argv in TOOLS.items()}
    for tool, flags in found:
        for flag in flags:
            # the whole flag: --prefix is not --prefix-start (which the tools do not abbreviate)
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helps[tool]), \
                f"README runs {tool} with {flag}, which its --help lacks"
