"""Reference consumers of voucher-bridge's results, for the teams that read them."""
