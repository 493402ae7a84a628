"""Contracts shared by every Stepwise service: wire types, subjects and JetStream helpers."""
