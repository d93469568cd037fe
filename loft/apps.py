from django.apps import AppConfig


class LoftConfig(AppConfig):
    name = "loft"
    verbose_name = "Loft platform"
