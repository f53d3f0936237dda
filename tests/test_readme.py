"""Every Python snippet in README.md runs: python -m pytest tests/test_readme.py"""

import os
import re

from conftest import ROOT


def test_readme_python_snippets_run():
    text = open(os.path.join(ROOT, "README.md")).read()
    snippets = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert snippets, "README.md has no python snippet"
    for code in snippets:
        exec(compile(code, "README.md", "exec"), {})
