"""`make bench`: voucher-bridge against a naive FastStream subscriber and a bare aiokafka loop."""
