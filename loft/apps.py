from django.apps import AppConfig


class LoftConfig(AppConfig):
    name = "loft"
    verbose_name = "Loft platform"

    def ready(self) -> None:
        from loft.observability import install_log_record_factory

        install_log_record_factory()
