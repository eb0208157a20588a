"""Parallelism: the device mesh (data, model) and NamedSharding placement of params and batches."""
