"""`python -m ddpm_lightning`: the `ddpm-lightning` command."""

from .cli import main

main()
