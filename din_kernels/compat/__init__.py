"""Drop-in replacements for other libraries' DIN layers."""
