"""Pure functions: losses, advantages, corrections. Each carries its equation in the docstring."""
