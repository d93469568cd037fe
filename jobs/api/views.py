from rest_framework.response import Response
from rest_framework.views import APIView

from jobs.api.serializers import ModelSerializer
from jobs.models import BaseModel
from loft.api.errors import LoftAPIError


class ModelListView(APIView):
    """``GET /v1/models``: the enabled base models of the catalogue."""

    def get(self, request):
        data = ModelSerializer(BaseModel.objects.enabled(), many=True).data
        return Response({"object": "list", "data": data})


class ModelDetailView(APIView):
    """``GET /v1/models/{model}``; model ids contain a slash, so the route takes a path."""

    def get(self, request, model: str):
        found = BaseModel.objects.enabled().filter(name=model).first()
        if found is None:
            raise LoftAPIError(
                f"The model '{model}' does not exist",
                status_code=404,
                param="model",
                code="model_not_found",
            )
        return Response(ModelSerializer(found).data)
