"""The operator console: what the service is doing, and putting right what went wrong, safely.

- `access`: who may look (viewers) and who may act (operators), HTTP Basic.
- `operations`: every look and every action, the same for the web pages, the JSON API and
  the command line; each action is recorded (the audit) and none can skip the store's rules.
- `deadletters`: the dead-letter topics, read back from Kafka.
- `redact`: what is never shown (tokens, passwords, mail tokens, PINs per the PIN setting).
- `web`: the pages and the JSON API, served beside the probes (health.py).
"""
