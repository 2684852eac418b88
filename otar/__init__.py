"""Over-the-air secured packets (ETSI TS 102 225 / 3GPP TS 31.115) and rekeying.

Pure functions over bytes; built by the OTA top-up issue. Nothing in this package does I/O.
"""
