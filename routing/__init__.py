"""Routers decide which expert receives which token; they return a RoutingPlan (routing.plan)."""
from routing.config import RouterConfig
from routing.plan import RoutingPlan
from routing.registry import ROUTERS, build_router

__all__ = ["RouterConfig", "RoutingPlan", "ROUTERS", "build_router"]
