"""Adapter pages: the list, one adapter, downloads and merged weights."""

from django.urls import path

from jobs import adapter_pages

urlpatterns = [
    path("adapters", adapter_pages.adapter_list, name="adapter-list"),
    path("adapters/<str:adapter_id>", adapter_pages.adapter_detail, name="adapter-detail"),
    path("adapters/<str:adapter_id>/merge", adapter_pages.adapter_merge, name="adapter-merge"),
    path(
        "adapters/<str:adapter_id>/merged.zip",
        adapter_pages.adapter_merged_download,
        name="adapter-merged-download",
    ),
]
