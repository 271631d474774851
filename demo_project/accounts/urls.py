from django.urls import path

from . import views

app_name = "accounts"

urlpatterns = [
    path("", views.account_list, name="list"),
    path("activity/", views.account_activity, name="activity"),
    path("accounts/<slug:name>/act/", views.act, name="act"),
    path("accounts/<slug:name>/save/", views.save, name="save"),
]
