/* keyjobs monitor: refresh the #kj-live part of a page every two seconds while work waits or runs.
 *
 * Not while the person is using that part: a row ticked for an action, or a
 * field or link with the focus, keeps the page as it is until they are done.
 *
 * The new part is the same server-rendered, autoescaped template as the page
 * itself; it is parsed into an inert document and its nodes moved in, so no
 * data ever passes through innerHTML.
 */
(function () {
  "use strict";
  var INTERVAL = 2000;

  function live() {
    return document.getElementById("kj-live");
  }

  function inUse(part) {
    return Boolean(part.querySelector("input[type=checkbox]:checked")) ||
      (document.activeElement !== document.body && part.contains(document.activeElement));
  }

  function schedule() {
    var current = live();
    if (current && current.dataset.active === "true") {
      window.setTimeout(refresh, INTERVAL);
    }
  }

  function refresh() {
    fetch(window.location.href, { credentials: "same-origin", headers: { "X-Requested-With": "fetch" } })
      .then(function (response) {
        if (!response.ok) {
          throw new Error(response.status + " " + response.statusText);
        }
        return response.text();
      })
      .then(function (text) {
        var fresh = new DOMParser().parseFromString(text, "text/html").getElementById("kj-live");
        var current = live();
        if (current && inUse(current)) {
          window.setTimeout(refresh, INTERVAL);
          return;
        }
        if (fresh && current) {
          current.replaceWith(document.adoptNode(fresh));
        }
        schedule();
      })
      .catch(function () {
        // A failed refresh (server restarting, session expired) is retried later, more slowly.
        window.setTimeout(refresh, INTERVAL * 5);
      });
  }

  document.addEventListener("DOMContentLoaded", schedule);
})();
