"""The gateway agent: CRL distribution, validation for MCUs, certificate lifecycle."""
