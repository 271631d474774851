from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    # The metrics endpoint, opt-in: /keyjobs/metrics (staff, or KEYJOBS_METRICS_TOKEN as a bearer token).
    path("keyjobs/", include("keyjobs.urls")),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("", include("demo_project.accounts.urls")),
]
