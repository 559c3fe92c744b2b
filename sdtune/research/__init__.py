"""Research-wing recipes that build on the core (e.g. the `tiny-pretrained` model)."""
