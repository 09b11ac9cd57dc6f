"""Dense -> MoE upcycling (issue: upcycle released dense weights). Not built yet."""
