"""Partitions shared by the asset groups."""

import dagster as dg

intent_partitions = dg.DynamicPartitionsDefinition(name="intents")
