"""mkdocs hook: regenerate the reference pages before every build."""

from pathlib import Path

from prunekit.docgen import write


def on_pre_build(config, **kwargs):
    write(Path(config["docs_dir"]) / "reference")
