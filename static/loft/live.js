// Live parts of a page: an element with data-live-url has its content replaced by that URL's
// fragment every two seconds, until a fragment carries data-final (the job has finished).
(function () {
  "use strict";
  document.querySelectorAll("[data-live-url]").forEach(function (box) {
    if (box.hasAttribute("data-final")) return;
    const url = box.dataset.liveUrl;
    function refresh() {
      fetch(url, { credentials: "same-origin", headers: { "X-Requested-With": "fetch" } })
        .then(function (response) { return response.ok ? response.text() : Promise.reject(response.status); })
        .then(function (html) {
          box.innerHTML = html;
          if (box.querySelector("[data-final]")) {
            box.setAttribute("data-final", "");
            return;
          }
          setTimeout(refresh, 2000);
        })
        .catch(function () { setTimeout(refresh, 5000); });
    }
    setTimeout(refresh, 2000);
  });
})();
