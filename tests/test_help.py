"""Help texts per family: what `fluxexport --help` and the options say matches the code's own registries and
defaults."""

from __future__ import annotations

from click.testing import CliRunner

from fluxexport.cli import main
from fluxexport.models.tiny import TINY_VARIANTS


def help_of(*command: str) -> str:
    result = CliRunner().invoke(main, [*command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def test_top_level_help_names_both_families():
    text = help_of()
    assert "FLUX.1" in text and "FLUX.2" in text


def test_tiny_help_lists_every_variant_of_the_registry():
    text = help_of("tiny")
    assert all(name in text for name in TINY_VARIANTS), text


def test_option_help_describes_flux2_and_every_backend():
    run = help_of("run")
    assert "merged into the weights" in run and "swapped into the graphs" in run and "refitted" in run
    assert "[klein] 4, [klein] base 50, [dev] 50" in run and "schnell 4, dev and Kontext 28" in run
    assert "FLUX.2's text encoder" in run and "chat template" in run
    assert "chat template" in help_of("build")
