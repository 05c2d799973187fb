"""voucher-bridge: POS and coupon commands from Kafka, applied once upstream, answered once."""

__version__ = "0.1.0"
