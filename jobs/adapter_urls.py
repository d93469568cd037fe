"""Adapter pages: the list, one adapter, downloads and merged weights."""

urlpatterns: list = []
